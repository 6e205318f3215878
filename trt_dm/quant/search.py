"""A per-layer format search under a quality budget (``--formats auto --budget E``): int8, FP8 (E4M3) or FP16 for
each quantizable layer, as many of the convolution and linear MACs as possible in the 8-bit formats, while the error
of the prediction the sampler uses (guided under CFG; each row with its timestep group's ranges, as the one-graph
engine runs it) stays within the budget on a held-out calibration batch. The result is one ``QuantConfig``:
``fp8_layers`` (the FP8 layers of an int8 model) and ``exclude`` (the FP16 ones): one graph, one engine.

1. Sensitivity, per layer and per 8-bit format: the whole model quantized in that format (its own ranges from the
   shared statistics), every layer but one kept in FP; relative MSE of the prediction vs FP on held-out
   trajectories (the calibration seed + 1), as ``trt_dm.quant.sensitivity`` measures blocks.
2. Choice: each layer takes its 8-bit format with the smaller error; with FP16 allowed, layers are taken in 8-bit
   in ascending order of error per MAC while the sum of their errors stays within the (working) budget: the
   quantization noise of different layers is nearly independent, so their errors roughly add.
3. Verification: the mix measured as a whole on the same batch, and the working budget searched (up to
   ``RESCALES`` re-solves): scaled by budget / measured (loosened at most 10x when under the budget, so that slack
   buys 8-bit MACs), then bisected between the largest working budget known to meet the budget and the smallest
   known to miss it; the mix within the budget with the most 8-bit MACs is kept. Without one, the 8-bit layer with
   the largest error per MAC goes to FP16, one at a time, each measured, until the mix meets the budget. A mix that
   cannot meet it (no FP16 allowed, or fewer 8-bit MACs than ``min_8bit_macs``) raises ``BudgetError`` with the best
   mix reached.

With ``measure="sampled"`` (``--budget-on sampled``) the budget bounds what the sampler makes instead: the relative
MSE of ``sampled_n`` held-out images sampled end to end by the mix vs FP (``SampledError``); step 2's working budget
starts as the budget times the all-8bit model's one-step / sampled error ratio, and every step-3 measurement samples.
Measured on ``default-cond`` at guidance 3 (docs/fp8.md): mixes with less one-step error sampled worse images, which
a one-step budget cannot see.

Cached beside the statistics as ``<recipe>.formats-<key>.json`` (key: the base config and the search settings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trt_dm.core.guidance import cfg_denoiser
from trt_dm.core.io import atomic_write
from trt_dm.core.ranges import RangeSet
from trt_dm.models.loading import LoadedModel
from trt_dm.quant.calib.trajectories import CalibSpec
from trt_dm.quant.calibrate import calib_conditioning, calibrate, fp_calibration_set
from trt_dm.quant.config import CALIB_CACHE_ROOT, QuantConfig
from trt_dm.quant.fakequant import fake_quant_unet, grouped_denoiser
from trt_dm.quant.modules import apply_ranges, quantized_layers
from trt_dm.quant.sensitivity import LeaveOut, layer_macs
from trt_dm.runtime.torch_runner import unet_denoiser
from trt_dm.sampling import sample_many

SEARCH_FORMATS = ("int8", "fp8", "fp16")
EIGHT_BIT = ("int8", "fp8")
RESCALES = 5  # re-solves with a scaled working budget before layers move to FP16 one at a time
SEARCH_VERSION = 2  # 2: the working budget also loosens (bisection) when a mix is under the budget
MEASURES = ("step", "sampled")


class BudgetError(RuntimeError):
    """No mix of the allowed formats meets the budget (and the 8-bit MAC share asked for); says what the best did."""


@dataclass(frozen=True)
class FormatSearch:
    """What to search: the allowed formats, the budget (relative MSE of the sampler's prediction vs FP on ``n``
    held-out calibration samples) and the least share of the MACs to keep in 8-bit formats."""
    budget: float
    formats: tuple[str, ...] = SEARCH_FORMATS
    min_8bit_macs: float = 0.0
    n: int = 64
    # what the budget bounds: "step", the relative MSE of one prediction on held-out calibration x_t; or "sampled",
    # the relative MSE of ``sampled_n`` held-out images sampled end to end (the calibration's sampler, steps,
    # labels and guidance) vs FP's from the same seeds: a mix whose error compounds over the steps is seen there.
    measure: str = "step"
    sampled_n: int = 16

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in SEARCH_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"--formats: unknown format {bad[0] if bad else '(none)'!r}; accepted 'auto' or a comma "
                             f"list of {', '.join(SEARCH_FORMATS)} with at least one 8-bit format")
        if not set(self.formats) & set(EIGHT_BIT):
            raise ValueError(f"--formats {','.join(self.formats)}: name at least one 8-bit format (int8, fp8)")
        if not (self.budget > 0 and self.budget < float("inf")):
            raise ValueError(f"--budget must be a relative MSE > 0 (e.g. 1e-3), got {self.budget!r}")
        if not 0 <= self.min_8bit_macs <= 1:
            raise ValueError(f"--min-8bit-macs must be a share in [0, 1], got {self.min_8bit_macs!r}")
        if self.n < 1 or self.sampled_n < 1:
            raise ValueError(f"the search's held-out samples must be >= 1, got {self.n} and {self.sampled_n}")
        if self.measure not in MEASURES:
            raise ValueError(f"--budget-on {self.measure!r}: accepted {', '.join(MEASURES)}")

    @classmethod
    def parse(cls, formats: str, budget: float | None, min_8bit_macs: float = 0.0, measure: str = "step"
              ) -> FormatSearch:
        """From the command line: ``--formats auto`` (all three) or a comma list, and ``--budget``."""
        if budget is None:
            raise ValueError("--formats needs --budget E: the relative MSE of the prediction vs FP the mix may reach "
                             "on held-out calibration samples (the all-int8 error is printed by the search)")
        names = SEARCH_FORMATS if formats == "auto" else tuple(dict.fromkeys(f.strip() for f in formats.split(",")))
        return cls(budget=budget, formats=names, min_8bit_macs=min_8bit_macs, measure=measure)

    @property
    def eight_bit(self) -> tuple[str, ...]:
        return tuple(f for f in EIGHT_BIT if f in self.formats)

    def check_base(self, qcfg: QuantConfig) -> None:
        """Refuse, before any work, a base config the search cannot start from."""
        if (qcfg.format != "int8" or qcfg.fp8_layers or qcfg.weight_bits != 8 or qcfg.rounding != "nearest"
                or qcfg.quantize_attention or qcfg.shortcut_split or qcfg.noisy_fp):
            raise ValueError("--formats searches W8A8 layers with nearest rounding: it cannot be combined with "
                             "--format fp8, --weight-bits 4 / 7, --rounding adaround, --quantize-attention, "
                             "--shortcut-split or --keep-fp-from-t")


@dataclass
class FormatMix:
    """The searched mix: its config, each layer's row (MACs, one-layer errors per format, the chosen format), the
    errors of the whole model in each single 8-bit format, and of the mix, on the held-out batch."""
    qcfg: QuantConfig
    layers: list[dict]
    rel_mse: float
    all_8bit: dict[str, dict]
    budget: float
    steps: list[dict]
    path: Path | None = None
    other_macs: int = 0  # MACs of the layers excluded before the search (conv_in, conv_out, the time embedding)
    measure: str = "step"  # what ``rel_mse`` and ``budget`` are (``FormatSearch.measure``)

    def macs_share(self) -> dict[str, float]:
        total = sum(r["macs"] for r in self.layers) + self.other_macs
        share = {f: sum(r["macs"] for r in self.layers if r["format"] == f) / total for f in SEARCH_FORMATS}
        share["fp16"] += self.other_macs / total
        return share

    def to_dict(self) -> dict:
        return {"version": SEARCH_VERSION, "measure": self.measure, "quant": self.qcfg.to_dict(), "rel_mse": self.rel_mse,
                "budget": self.budget, "all_8bit": self.all_8bit, "other_macs": self.other_macs,
                "macs_share": self.macs_share(), "steps": self.steps, "layers": self.layers}

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> FormatMix:
        q = d["quant"]
        qcfg = QuantConfig(exclude=tuple(q["exclude"]), fp8_layers=tuple(q.get("fp8_layers", ())),
                           weight_calib=q["weight_calib"])
        return cls(qcfg, d["layers"], d["rel_mse"], d["all_8bit"], d["budget"], d["steps"], path, d["other_macs"],
                   d.get("measure", "step"))


def _choose(rows: list[dict], budget: float, allow_fp16: bool) -> None:
    """Step 2: each row's ``format`` (its better 8-bit format; FP16 for those outside the budget's greedy pick)."""
    order = sorted(rows, key=lambda r: (r["error"] / max(r["macs"], 1), r["layer"]))
    spent = 0.0
    for r in order:
        if not allow_fp16 or spent + r["error"] <= budget:
            r["format"], spent = r["best"], spent + r["error"]
        else:
            r["format"] = "fp16"


def _mix_config(base: QuantConfig, rows: list[dict]) -> QuantConfig:
    fp8 = tuple(sorted(r["layer"] for r in rows if r["format"] == "fp8"))
    fp16 = tuple(sorted(r["layer"] for r in rows if r["format"] == "fp16"))
    return dataclasses.replace(base, fp8_layers=fp8, exclude=base.exclude + fp16)


def search_key(base: QuantConfig, search: FormatSearch, spec: CalibSpec) -> str:
    blob = json.dumps({"v": SEARCH_VERSION, "quant": base.to_dict(), "search": dataclasses.asdict(search),
                       "calib": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def search_formats(loaded: LoadedModel, spec: CalibSpec, base: QuantConfig, recipe: str, search: FormatSearch, *,
                   cache_root: Path = CALIB_CACHE_ROOT, batch_size: int = 64, progress: bool = True) -> FormatMix:
    """The format mix for ``search`` (module docstring), from the cache or searched now."""
    search.check_base(base)
    kw = dict(cache_root=cache_root, batch_size=batch_size, progress=progress)
    per_format = {f: calibrate(loaded, spec, dataclasses.replace(base, format=f), recipe, **kw)
                  for f in search.eight_bit}
    path = next(iter(per_format.values())).stats_dir / f"{recipe}.formats-{search_key(base, search, spec)}.json"
    if path.exists():
        return FormatMix.from_dict(json.loads(path.read_text()), path)
    small = dataclasses.replace(spec, n=min(search.n, spec.n), seed=spec.seed + 1)  # held-out trajectories
    calib, guidance = fp_calibration_set(loaded, small, batch_size=batch_size, progress=False)
    leave, rows, all_8bit = {}, {}, {}
    for f, res in per_format.items():
        qcfg = dataclasses.replace(base, format=f)
        qunet = fake_quant_unet(loaded, qcfg, res.ranges, weights=res.weights_path)
        leave[f] = LeaveOut(loaded, qunet, res.ranges, calib, guidance, qcfg, batch_size)
        layers = quantized_layers(qunet)
        quantizers = {n: [m.input_quantizer, m.weight_quantizer] for n, m in layers.items()}
        all_8bit[f] = {**leave[f].errors([]), "by_group": _by_group(leave[f])}
        for name in tqdm(layers, desc=f"format search: {f} one layer at a time", unit="layer", disable=not progress):
            others = [q for n, qs in quantizers.items() if n != name for q in qs]
            rows.setdefault(name, {"layer": name})[f] = leave[f].errors(others)["rel_mse"]
    macs = layer_macs(loaded.unet, calib.x[:1], calib.t[:1], {c: v[:1] for c, v in calib.cond.items()})
    for name, r in rows.items():
        r["macs"] = macs.get(name, 0)
        r["best"] = min(search.eight_bit, key=lambda f: (r[f], f))
        r["error"] = r[r["best"]]
    table = sorted(rows.values(), key=lambda r: r["layer"])
    sampled = None
    if search.measure == "sampled":  # the budget bounds sampled images: each all-8bit model's error there too
        sampled = SampledError(loaded, spec, search.sampled_n, batch_size)
        for f in all_8bit:
            all_8bit[f]["sampled_rel_mse"] = sampled.rel_mse(leave[f].qunet, leave[f].ranges, [])
    mix = _verify(loaded, spec, base, recipe, search, table, calib, guidance, kw, progress, sampled,
                  all_8bit[search.eight_bit[0]])
    mix.all_8bit = all_8bit
    mix.other_macs = sum(v for n, v in macs.items() if n not in rows)
    macs_8 = 1 - mix.macs_share()["fp16"]
    if mix.rel_mse > search.budget or macs_8 < search.min_8bit_macs - 1e-12:
        least = (f" with at least {search.min_8bit_macs:.1%} of the MACs in 8-bit formats" if search.min_8bit_macs
                 else "")
        raise BudgetError(f"the budget cannot be met with --formats {','.join(search.formats)}: relative MSE "
                          f"{search.budget:.3g}{least}; the best mix reached {mix.rel_mse:.3g} with {macs_8:.1%} of "
                          f"the MACs in 8-bit formats (all-"
                          + ", all-".join(f"{f} {e.get('sampled_rel_mse', e['rel_mse']):.3g}"
                                          for f, e in all_8bit.items()) + ")")
    atomic_write(path, (json.dumps(mix.to_dict(), indent=1, sort_keys=True) + "\n").encode())
    mix.path = path
    return mix


def _by_group(leave: LeaveOut) -> list[float]:
    """The quantized model's relative MSE vs FP in each timestep group of its ranges (rows of that group)."""
    d = (leave.quantized_prediction([]) - leave.ref).double().square()
    ref = leave.ref.double().square()
    return [float(d[leave.groups == k].mean() / ref[leave.groups == k].mean())
            for k in torch.unique(leave.groups).tolist()]


def _measure(loaded, spec, base, recipe, rows, calib, guidance, kw, models: dict, sampled: SampledError | None = None
             ) -> tuple[QuantConfig, float]:
    """Step 3's measurement: the mix of ``rows``' formats as one model on the held-out batch (FP16 layers' quantizers
    off: the same ranges as the final config, whose statistics are the shared FP activations). ``models`` keeps the
    fake-quant model of each FP8 layer set measured: moving layers to FP16 only switches quantizers off, so those
    steps reuse it instead of recomputing its ranges and FP reference."""
    qcfg = _mix_config(base, rows)
    if qcfg.fp8_layers not in models:
        quantized = dataclasses.replace(qcfg, exclude=base.exclude)  # every layer quantized; FP16 ones switched off
        res = calibrate(loaded, spec, quantized, recipe, **kw)
        qunet = fake_quant_unet(loaded, quantized, res.ranges, weights=res.weights_path)
        models[qcfg.fp8_layers] = (LeaveOut(loaded, qunet, res.ranges, calib, guidance, quantized, kw["batch_size"]),
                                   quantized_layers(qunet))
    leave, layers = models[qcfg.fp8_layers]
    off = [q for r in rows if r["format"] == "fp16" for q in (layers[r["layer"]].input_quantizer,
                                                               layers[r["layer"]].weight_quantizer)]
    if sampled is not None:
        return qcfg, sampled.rel_mse(leave.qunet, leave.ranges, off)
    return qcfg, leave.errors(off)["rel_mse"]


def _verify(loaded, spec, base, recipe, search: FormatSearch, rows, calib, guidance, kw, progress,
            sampled: SampledError | None = None, all_first: dict | None = None):
    """Step 3 of the module docstring: the mix, with the steps taken and their measured errors. With a sampled
    budget the first working budget (in the per-layer one-step errors' units) is the budget scaled by the all-8bit
    model's one-step / sampled error ratio."""
    allow_fp16 = "fp16" in search.formats
    working, steps, models, seen = search.budget, [], {}, {}
    if sampled is not None and all_first and all_first.get("sampled_rel_mse"):
        working = search.budget * all_first["rel_mse"] / all_first["sampled_rel_mse"]

    def record(kind: str) -> tuple[QuantConfig, float]:
        key = tuple(r["format"] for r in rows)  # the choice is a function of the working budget: measure it once
        if key not in seen:
            seen[key] = _measure(loaded, spec, base, recipe, rows, calib, guidance, {**kw, "progress": False},
                                 models, sampled)
        qcfg, err = seen[key]
        fp16 = [r for r in rows if r["format"] == "fp16"]
        steps.append({"step": kind, "working_budget": working, "rel_mse": err, "fp16_layers": len(fp16),
                      "macs_8bit": eight_bit_macs() / max(sum(r["macs"] for r in rows), 1)})
        return qcfg, err

    def eight_bit_macs() -> int:
        return sum(r["macs"] for r in rows if r["format"] != "fp16")

    _choose(rows, working, allow_fp16)
    qcfg, err = record("choose")
    best = None  # (8-bit MACs, -error, formats, qcfg, error) of the best mix within the budget
    meets, misses = None, None  # the largest working budget known to meet the budget, the smallest known to miss
    for i in range(RESCALES + 1 if allow_fp16 else 0):
        if err <= search.budget:
            meets = max(meets or working, working)
            cand = (eight_bit_macs(), -err, [r["format"] for r in rows], qcfg, err)
            best = cand if best is None or cand[:2] > best[:2] else best
            if all(r["format"] != "fp16" for r in rows):
                break  # everything in 8-bit already
        else:
            misses = min(misses or working, working)
        if i == RESCALES:
            break
        if meets is not None and misses is not None:  # between the two: halve the gap (geometrically)
            working = (meets * misses) ** 0.5
        else:  # errors roughly add: scale by budget / measured (at most 10x up: a looser choice spends the slack)
            working *= min(search.budget / max(err, 1e-30), 10.0)
        _choose(rows, working, allow_fp16)
        qcfg, err = record("rescale")
    if best is not None:  # the mix within the budget with the most 8-bit MACs that the rescales found
        for r, f in zip(rows, best[2]):
            r["format"] = f
        qcfg, err = best[3], best[4]
    with tqdm(desc="format search: layers to FP16", unit="layer", disable=not progress) as bar:
        while allow_fp16 and err > search.budget:
            eight = [r for r in rows if r["format"] != "fp16"]
            if not eight:
                break
            worst = max(eight, key=lambda r: (r["error"] / max(r["macs"], 1), r["layer"]))
            worst["format"] = "fp16"
            qcfg, err = record(f"fp16 {worst['layer']}")
            bar.update()
    return FormatMix(qcfg, rows, err, {}, search.budget, steps, measure=search.measure)


class SampledError:
    """A mix's error on images sampled end to end: ``n`` held-out seeds (the calibration's seed + 2: neither the
    calibration's trajectories nor the one-step held-out ones) with the calibration's sampler, steps, labels and
    guidance, drawn by the FP model once and by each fake-quant model measured (its range groups switched by
    timestep, as the one-graph engine runs them); relative MSE of the final samples vs FP's."""

    def __init__(self, loaded: LoadedModel, spec: CalibSpec, n: int, batch_size: int) -> None:
        held = dataclasses.replace(spec, n=n, seed=spec.seed + 2)
        self.cond, self.guidance = calib_conditioning(loaded, held)
        self.seeds = [held.seed * 1_000_003 + j for j in range(n)]
        self.spec, self.shape, self.batch_size = held, loaded.sample_shape, batch_size
        self.schedule = loaded.schedule()
        self.ref = self._sample(unet_denoiser(loaded.unet))

    def _sample(self, den) -> torch.Tensor:
        s = self.spec
        return sample_many(cfg_denoiser(den, self.guidance), self.schedule, self.seeds, self.shape,
                           batch_size=self.batch_size, progress=False, conditioning=self.cond, sampler=s.sampler,
                           steps=s.steps, eta=s.eta)

    def rel_mse(self, qunet: torch.nn.Module, ranges: RangeSet, disabled: list) -> float:
        """``qunet``'s images with the ``disabled`` quantizers off, vs FP's: relative MSE."""
        den = grouped_denoiser(qunet, ranges) if ranges.is_grouped else unet_denoiser(qunet)
        if not ranges.is_grouped:
            apply_ranges(qunet, ranges.amax(0))
        for q in disabled:
            q.disable()
        try:
            out = self._sample(den)
        finally:
            for q in disabled:
                q.enable()
        return float((out - self.ref).double().square().mean() / self.ref.double().square().mean())
