"""The one way trt_dm writes files: ``atomic_write`` (temporary name, fsync, rename), so a crash never leaves a
half-written file under the final name; ``write_json``; ``sha256_file``."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path



def write_json(path: str | os.PathLike, doc: Any, indent: int = 1) -> Path:
    return atomic_write(path, (json.dumps(doc, indent=indent) + "\n").encode())



def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
