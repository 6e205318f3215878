"""The `trt-dm` command: arguments -> the settings of ``trt_dm.api`` -> printed results. No pipeline logic
lives here.

    trt-dm sample --model default --sampler ddim --steps 50 --n 64 --seed 0 --out grid.png
    trt-dm eval   --model default --steps 100 --n 2000 --out-dir reports/fp-ddim100
    trt-dm info   --model default

Exit codes: 0 success; 1 the work failed (a check found violations, an engine does not fit, a damaged cache);
2 a usage error (a bad argument, a model or file that cannot be used as given), reported in one line.
"""
from __future__ import annotations

import logging
import sys

import torch

from trt_dm.cli import commands as C
from trt_dm.cli.parser import build_parser
from trt_dm.cli.serve import cmd_serve
from trt_dm.cli.settings import UsageError
from trt_dm.core.flavour import EngineError
from trt_dm.models.loading import ModelLoadError
from trt_dm.quant.calib.stats import CalibCacheError

log = logging.getLogger("trt_dm")


# Each command's function, by the name the parser gives it.
COMMANDS = {"sample": C.cmd_sample, "eval": C.cmd_eval, "calibrate": C.cmd_calibrate, "export": C.cmd_export,
            "build": C.cmd_build, "engine": C.cmd_engine, "profile": C.cmd_profile, "serve": cmd_serve,
            "check": C.cmd_check, "info": C.cmd_info}


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # modelopt, irrelevant here
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the libraries' tracing and conversion chatter: shown with -v only
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"modelopt\..*")
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except (CalibCacheError, EngineError, RuntimeError) as e:  # the work failed: exit 1
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UsageError, ModelLoadError, FileNotFoundError, ValueError) as e:  # bad input: exit 2, one line
        if args.verbose:
            raise
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
