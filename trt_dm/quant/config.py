"""A quantization setup, in one place: ``QuantConfig`` (what is quantized and how: weight bits, exclusions, rounding,
precision by timestep), ``QuantSettings`` (a config + recipe + calibration set + cache) and ``default_recipe``."""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trt_dm.core.errors import InputError
from trt_dm.models.loading import LoadedModel
from trt_dm.models.text import builtin_prompts
from trt_dm.quant.calib.ranges import DEFAULT_RECIPE, ONE_RANGE_RECIPE, get_recipe
from trt_dm.quant.calib.trajectories import CalibSpec

# Where calibration statistics, ranges, reconstructed weights and cached FP samples live (`--cache-dir`).
CALIB_CACHE_ROOT = Path("calib_cache")

# Layers left in high precision by default. The time-embedding MLP reads the timestep sinusoid (values
# in [-1, 1] that encode t: int8 steps of 1/127 blur neighbouring timesteps), and conv_in / conv_out touch
# the image and the predicted noise directly. To be confirmed by `trt-dm calibrate --sensitivity`. The same for a
# DiT: its adaLN embeddings of timestep and class (``*.emb.*``), the patch embedding and the last projection; and
# SDXL's added embedding MLP (``add_embedding``: pooled text and micro-conditioning time ids, one vector per image,
# no measurable cost in FP). Each pattern matches nothing in the other kind of model.
DEFAULT_EXCLUDE: tuple[str, ...] = ("time_embedding.*", "conv_in", "conv_out", "*.emb.*", "pos_embed.proj",
                                    "proj_out_2", "add_embedding.*")



WEIGHT_CALIBS = ("max", "mse")



# candidates 0.30, 0.31, ..., 1.00 x the channel's abs-max (a clip above the abs-max only loses resolution)
WEIGHT_MSE_SEARCH = {"method": "mse", "start_multiplier": 0.3, "stop_multiplier": 1.0, "step_size": 0.01}



ROUNDINGS = ("nearest", "adaround")



RECON_TEMB = ("block", "separate")



# 7: codes in [-64, 63], so the u8 x s8 pair sums of int8 kernels without VNNI (vpmaddubsw, 16-bit saturating)
# stay exact (2 x 255 x 64 < 32767): OpenVINO / ONNX Runtime int8 on AVX2-only CPUs compute the graph itself
WEIGHT_BITS = (8, 7, 4)



# The 8-bit formats: "int8" (symmetric, s = amax / 127) or "fp8" (E4M3, s = amax / 448: trt_dm.quant.calib.fp8),
# for weights (per output channel) and activations (per tensor) alike
FORMATS = ("int8", "fp8")



@dataclass(frozen=True)
class QuantConfig:
    # 8; 4 (W4A8) or 7 (W7A8: int8 kernels without VNNI cannot saturate): the integers stored on the int8 grid
    # (weights_on_int8_grid), so every int8 engine / runtime runs them
    weight_bits: int = 8
    act_bits: int = 8
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # fnmatch patterns on module names (e.g. "up_blocks.2.*")
    # Q-Diffusion's shortcut split (Li et al., ICCV 2023, sec. 3.3): the up path's resnets read
    # concat(h, skip), two halves with very different ranges; give each half its own activation range.
    # Fake-quant only: TensorRT wants per-tensor activation scales, so such a model is not exportable.
    shortcut_split: bool = False
    # Also quantize the attention matmul inputs (Q, K, V: int8 per tensor) through modelopt's diffusers
    # attention plugin; the softmax output stays in high precision.
    quantize_attention: bool = False
    # Weight ranges (per output channel, no data needed): "max" = abs-max; "mse" = modelopt's search for the
    # clip (WEIGHT_MSE_SEARCH multiples of the abs-max) minimising the weights' squared quantization error.
    weight_calib: str = "max"
    # Weight rounding: "nearest", or "adaround": learned by block reconstruction against the FP model on the
    # calibration set (trt_dm.calib.reconstruct; recon_iters Adam steps per block), folded into the weights.
    rounding: str = "nearest"
    recon_iters: int = 500
    # With learned rounding: Adam steps per block on its layers' input ranges afterwards (0: the recipe's ranges)
    recon_act_iters: int = 0
    # With learned rounding, where the resnets' time-embedding projections are reconstructed: "block" (in their
    # resnet, on its output) or "separate" (all of them first, as one unit on their own outputs: TFMQ-DM's
    # time-information block)
    recon_temb: str = "block"
    # With weight_bits < 8: fnmatch patterns on module names whose weights stay 8-bit (mixed precision, as
    # Q-Diffusion keeps its most sensitive layers at 8 bits): e.g. the first resolution, "down_blocks.0.*"
    w8_layers: tuple[str, ...] = ()
    # Precision by timestep: layers (fnmatch patterns) kept in high precision at the noisy steps t >= fp_from_t
    # only, quantized below it. Deployed as two graphs / engines switched by t (the noisy one without those layers'
    # Q/DQ); the statistics and ranges are the plain config's (every layer is quantized at some step).
    noisy_fp: tuple[str, ...] = ()
    fp_from_t: int | None = None
    format: str = "int8"  # FORMATS
    # A mix of formats in one graph (``trt_dm.quant.search``, ``--formats``): fnmatch patterns on module names of the
    # layers quantized to FP8 (E4M3) in an int8 model; the others stay int8, the excluded ones FP
    fp8_layers: tuple[str, ...] = ()
    # Channel balancing (SmoothQuant, Xiao et al., ICML 2023; PTQ4DiT's balancing): for the quantized Linear and
    # Conv2d layers (those ``smooth_layers`` fnmatch patterns name; none given: all), each input channel j is divided by
    # s_j = max|X_j|^smooth / max|W_:,j|^(1 - smooth) and the weight column multiplied by it, so outlier channels move
    # from the per-tensor activation range into the per-channel weight ranges. 0: off. The 1/s is the input
    # quantizer's pre_quant_scale: a Mul before the layer's Q/DQ in the graph (``trt_dm.quant.calib.smooth``).
    smooth: float = 0.0
    smooth_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.fp8_layers and (self.format != "int8" or self.quantize_attention):
            raise ValueError("fp8_layers names the FP8 layers of an int8 model (a format mix): it needs format int8 "
                             "and no --quantize-attention")
        if self.uses_fp8 and (self.weight_bits != 8 or self.rounding != "nearest"):
            raise ValueError("--format fp8 quantizes weights to E4M3 (8 bits, nearest rounding): --weight-bits 4 / 7 "
                             "and --rounding adaround are int8-grid options")
        if bool(self.noisy_fp) != (self.fp_from_t is not None):
            raise ValueError("noisy_fp (--keep-fp with --keep-fp-from-t) names the layers kept in FP at the noisy "
                             "steps and fp_from_t where those begin: give both or neither")
        if self.fp_from_t is not None and self.fp_from_t < 1:
            raise ValueError(f"fp_from_t (--keep-fp-from-t) must be >= 1, got {self.fp_from_t}")
        if self.fp_from_t is not None and self.rounding != "nearest":
            raise ValueError("--keep-fp-from-t with learned rounding: the rounding is learned for one set of quantized "
                             "layers, two are deployed here; use --keep-fp (every step) or --rounding nearest")
        both = [p for p in self.noisy_fp if p in self.exclude]
        if both:
            raise ValueError(f"pattern {both[0]!r} is excluded at every step already (--exclude); --keep-fp with "
                             "--keep-fp-from-t names layers quantized at the steps below it")
        if self.w8_layers and self.weight_bits == 8:
            raise ValueError("w8_layers keeps some layers' weights at 8 bits in a lower-bit model: it needs "
                             "weight_bits 4 or 7 (--weight-bits 4)")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.recon_iters < 1:
            raise ValueError(f"recon_iters (--recon-iters) must be >= 1, got {self.recon_iters}")
        if self.recon_act_iters < 0:
            raise ValueError(f"recon_act_iters (--recon-act-iters) must be >= 0, got {self.recon_act_iters}")
        if self.recon_act_iters and self.rounding == "nearest":
            raise ValueError("recon_act_iters refines activation ranges after learned rounding: it needs "
                             "rounding 'adaround' (--rounding adaround)")
        if self.recon_temb not in RECON_TEMB:
            raise ValueError(f"recon_temb must be one of {', '.join(RECON_TEMB)}, got {self.recon_temb!r}")
        if self.recon_temb != "block" and self.rounding == "nearest":
            raise ValueError("recon_temb chooses how learned rounding treats the time-embedding projections: it needs "
                             "rounding 'adaround' (--rounding adaround)")
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.weight_bits}")
        if self.weight_calib not in WEIGHT_CALIBS:
            raise ValueError(f"weight_calib must be one of {', '.join(WEIGHT_CALIBS)}, got {self.weight_calib!r}")
        if self.act_bits != 8:
            raise ValueError(f"act_bits must be 8 (int8 activations), got {self.act_bits}")
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth (--smooth) is SmoothQuant's migration strength in [0, 1] (0: off), got "
                             f"{self.smooth}")
        if self.smooth_layers and not self.smooth:
            raise ValueError("smooth_layers (--smooth-layers) names the layers to balance: it needs --smooth ALPHA")
        if self.smooth and (self.rounding != "nearest" or self.weight_calib != "max" or self.weight_bits != 8):
            raise ValueError("--smooth balances channels for 8-bit weights with abs-max ranges and nearest rounding; "
                             "it does not combine with --rounding adaround, --weight-calib mse or --weight-bits 4 / 7")

    @property
    def uses_fp8(self) -> bool:
        """Whether any layer is FP8 (E4M3): the whole model, or some layers of a mix."""
        return self.format == "fp8" or bool(self.fp8_layers)

    @property
    def precision(self) -> str:
        """The 8-bit formats of the graph, as engines and reports name them: "int8", "fp8" or "int8+fp8" (a mix)."""
        return "int8+fp8" if self.fp8_layers else self.format

    def format_of(self, layer: str) -> str:
        """The 8-bit format of quantized layer ``layer`` (module name; a split half's range name counts as its
        layer): FP8 where an ``fp8_layers`` pattern names it, else ``format``."""
        layer = layer.split("#")[0]
        return "fp8" if any(fnmatch.fnmatchcase(layer, p) for p in self.fp8_layers) else self.format

    def excludes(self, layer: str) -> bool:
        """Whether an ``exclude`` pattern names module ``layer`` (kept in high precision)."""
        return any(fnmatch.fnmatchcase(layer, p) for p in self.exclude)

    def weight_bits_of(self, layer: str) -> int:
        """The weight width of quantized layer ``layer`` (module name): 8 where a ``w8_layers`` pattern names it."""
        return 8 if any(fnmatch.fnmatchcase(layer, p) for p in self.w8_layers) else self.weight_bits

    def activation_dict(self) -> dict:
        """The part of the config that decides which layer inputs get activation ranges (and so the statistics and
        the recipe's ranges); weight bits, weight calibration and rounding do not change them."""
        return {"act_bits": self.act_bits, "exclude": list(self.exclude), "shortcut_split": self.shortcut_split,
                "quantize_attention": self.quantize_attention,  # the format only changes ranges (``ranges_name``)
                **({"smooth": self.smooth, "smooth_layers": list(self.smooth_layers)} if self.smooth else {})}

    def ranges_name(self, recipe: str) -> str:
        """The ranges file of ``recipe`` beside the statistics (int8: ``<recipe>.json``, else ``<recipe>.<fmt>.json``)."""
        if self.fp8_layers:  # a mix: '<recipe>.mix-<hash of its FP8 layers>.json'
            return f"{recipe}.mix-{hashlib.sha256(chr(0).join(self.fp8_layers).encode()).hexdigest()[:8]}.json"
        return f"{recipe}.json" if self.format == "int8" else f"{recipe}.{self.format}.json"

    def to_dict(self) -> dict:
        return {**({"format": self.format} if self.format != "int8" else {}),
                **({"fp8_layers": list(self.fp8_layers)} if self.fp8_layers else {}),
                "weight_bits": self.weight_bits, "act_bits": self.act_bits, "exclude": list(self.exclude),
                "shortcut_split": self.shortcut_split, "quantize_attention": self.quantize_attention,
                "weight_calib": self.weight_calib, "rounding": self.rounding,
                **({"recon_iters": self.recon_iters} if self.rounding != "nearest" else {}),
                **({"recon_act_iters": self.recon_act_iters} if self.recon_act_iters else {}),
                **({"recon_temb": self.recon_temb} if self.recon_temb != "block" else {}),
                **({"w8_layers": list(self.w8_layers)} if self.w8_layers else {}),
                **({"noisy_fp": list(self.noisy_fp), "fp_from_t": self.fp_from_t} if self.noisy_fp else {}),
                **({"smooth": self.smooth, "smooth_layers": list(self.smooth_layers)} if self.smooth else {})}

    def segments(self, num_train_timesteps: int) -> list[tuple[tuple[int, int] | None, QuantConfig]]:
        """[(t_range, config)] of the deployment: one ``(None, self)``, or with ``fp_from_t`` the noisy steps
        ``((T - 1, fp_from_t), noisy_fp excluded)`` and the rest ``((fp_from_t - 1, 0), the layers quantized)``."""
        if self.fp_from_t is None:
            return [(None, self)]
        if self.fp_from_t >= num_train_timesteps:
            raise ValueError(f"--keep-fp-from-t {self.fp_from_t} is beyond the schedule's timesteps "
                             f"0..{num_train_timesteps - 1}")
        plain = replace(self, noisy_fp=(), fp_from_t=None)
        return [((num_train_timesteps - 1, self.fp_from_t), replace(plain, exclude=self.exclude + self.noisy_fp)),
                ((self.fp_from_t - 1, 0), plain)]


def default_recipe(qcfg=None, spec=None, target: str | None = None) -> tuple[str, str]:
    """The recipe used when none is named, and why when it is not ``DEFAULT_RECIPE``: ``ptq4dm-g4`` (four
    timestep-dependent range sets, deployed as one graph), or the paper's ``ptq4dm`` where the settings take one
    range set: the ort-cpu target, learned input ranges (``--recon-act-iters``: one range per layer), split shortcuts or
    quantized attention matmuls (no one-graph form), fewer calibration steps than groups."""
    qcfg = qcfg or QuantConfig()
    why = [reason for cond, reason in (
        (target == "ort-cpu", "--target ort-cpu"), (qcfg.recon_act_iters > 0, "--recon-act-iters"),
        (qcfg.shortcut_split, "--shortcut-split"), (qcfg.quantize_attention, "--quantize-attention"),
        (spec is not None and spec.steps < 4, f"--calib-steps {getattr(spec, 'steps', '')}")) if cond]
    if why:
        return ONE_RANGE_RECIPE, (f"recipe {ONE_RANGE_RECIPE} (the default {DEFAULT_RECIPE} has 4 timestep range "
                                  f"sets; {', '.join(why)} takes one)")
    return DEFAULT_RECIPE, ""



@dataclass(frozen=True)
class QuantSettings:
    """How the model is quantized and calibrated (``trt-dm calibrate`` / ``export`` / ``engine`` / ``eval --recipe``).
    ``recipe`` None: ``default_recipe`` for these settings (and the target, when deploying)."""
    recipe: str | None = None
    spec: Any = None        # trt_dm.calib.trajectories.CalibSpec (default: CalibSpec())
    qcfg: Any = None        # trt_dm.quant.QuantConfig (default: QuantConfig())
    cache_root: Path = CALIB_CACHE_ROOT
    batch: int = 64         # images per UNet call while calibrating

    def resolved(self, loaded: LoadedModel | None = None, target: str | None = None) -> QuantSettings:
        """Defaults filled in (the recipe for ``target`` when deploying); with ``loaded``, a class-conditional
        model calibrates on every class in turn (balanced) unless the spec names labels, and guided trajectories
        take the model's guidance interval unless the spec names one."""
        spec = self.spec or CalibSpec()
        recipe = self.recipe or default_recipe(self.qcfg, spec, target)[0]
        get_recipe(recipe)  # validate before any work
        if loaded is not None and loaded.class_labels_spec is not None and spec.labels is None:
            spec = dataclasses.replace(spec, labels="all")
        if loaded is not None and loaded.text_conditioned and spec.prompts is None and spec.embeddings is None:
            if loaded.text is None:
                sdxl = " and pooled_prompt_embeds (N, P)" if loaded.added_cond else ""
                raise InputError(f"{loaded.name!r} has no text encoder to encode calibration prompts (a UNet saved "
                                 "without its pipeline): give --calib-embeddings FILE.safetensors with prompt_embeds "
                                 f"(N, S, D){sdxl}, and for guidance negative_prompt_embeds (1, S, D)"
                                 + (" and negative_pooled_prompt_embeds (1, P)" if sdxl else "")
                                 + ", or the pipeline directory instead", field="calib_embeddings",
                                 flag="--calib-embeddings")
            spec = dataclasses.replace(spec, prompts=builtin_prompts())  # the project's 141 prompts
        if loaded is not None:  # the model's guidance interval, explicit in the statistics' cache key
            spec = dataclasses.replace(spec, guidance_interval=loaded.resolve_interval(spec.guidance_scale,
                                                                                       spec.guidance_interval))
        return dataclasses.replace(self, recipe=recipe, spec=spec, qcfg=self.qcfg or QuantConfig(),
                                   cache_root=Path(self.cache_root))
