"""What this CPU's int8 dot products are, and which weight codes they sum exactly (read by the OpenVINO target's
report and by the OpenVINO runner). Without VNNI or AMX, x86 int8 kernels multiply u8 activations by s8 weights
with ``vpmaddubsw``, which adds the products in pairs into a saturating 16-bit sum: exact only while
2 x 255 x |w| <= 32767, i.e. |w| <= 64 (``--weight-bits 7``)."""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install 'trt_dm[openvino]' (or openvino==2026.4.1)"
# the largest |weight code| whose two products with u8 activations (<= 255) sum within int16: 2 x 255 x 64 = 32640
SAFE_WEIGHT_CODE = 64


def cpu_int8_isa(cpuinfo: str | None = None) -> str:
    """The CPU's best int8 dot-product instructions (Linux /proc/cpuinfo flags): amx, avx512_vnni, avx_vnni, or
    avx2 / none; "unknown" without /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    flags = set(cpuinfo.split())
    for isa, flag in (("amx", "amx_int8"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return "none"


def pair_sums_saturate(isa: str) -> bool:
    """Whether int8 kernels on a CPU with these instructions add u8 x s8 products into saturating 16-bit sums."""
    return isa in ("avx2", "none")
