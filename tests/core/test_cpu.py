"""trt_dm.core.cpu: the CPU's int8 instructions from /proc/cpuinfo flags, and which of them saturate."""
from trt_dm.core.cpu import SAFE_WEIGHT_CODE, cpu_int8_isa, pair_sums_saturate


def test_isa_from_flags_best_first():
    assert cpu_int8_isa("flags : fpu sse2 avx2 fma avx512f avx512_vnni amx_int8 amx_tile") == "amx"
    assert cpu_int8_isa("flags : fpu avx2 avx512f avx512_vnni") == "avx512_vnni"
    assert cpu_int8_isa("flags : fpu avx2 avx_vnni") == "avx_vnni"
    assert cpu_int8_isa("flags : fpu sse2 avx2 fma") == "avx2"  # Zen 3, this project's CPU
    assert cpu_int8_isa("flags : fpu sse2") == "none"
    assert cpu_int8_isa("flags : avx512_vnni_extra") == "none"  # whole flags only
    assert cpu_int8_isa() in ("amx", "avx512_vnni", "avx_vnni", "avx2", "none", "unknown")


def test_saturation_bound():
    assert [pair_sums_saturate(i) for i in ("amx", "avx512_vnni", "avx_vnni", "avx2", "none")] == \
        [False, False, False, True, True]
    # two u8 x s8 products within int16 exactly up to the bound, not one code above it
    assert 2 * 255 * SAFE_WEIGHT_CODE <= 32767 < 2 * 255 * (SAFE_WEIGHT_CODE + 1)
