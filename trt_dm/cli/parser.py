"""The `trt-dm` argument parser: every command's flags, usage errors in one line (exit code 2)."""
from __future__ import annotations

import argparse
import shlex

from trt_dm import __version__
from trt_dm.core.flavour import FLAVOURS
from trt_dm.core.schedule import SAMPLERS
from trt_dm.targets import targets
from trt_dm.targets.trt_builder import BuildOptions

# Distributions whose versions decide results, in `trt-dm --version` (for bug reports); absent ones are skipped.
_VERSIONED = ("torch", "diffusers", "nvidia-modelopt", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13",
              "openvino")



class _Version(argparse.Action):
    """``--version``: trt-dm's version and those of the libraries it runs on, one line; exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print versions (trt-dm and its libraries) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        found = []
        for dist in _VERSIONED:
            try:
                found.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                pass
        print(f"trt-dm {__version__} ({', '.join(found)})")  # stdout, as argparse's own version action
        parser.exit(0)



class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")



def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (the embedded Fashion-MNIST DDPM), a diffusers UNet directory "
                        "(save_pretrained layout) or a pipeline directory with unet/ and scheduler/")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept weights stored only as PyTorch pickles (.bin); loaded with weights_only=True")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")



def _add_sampling_args(p: argparse.ArgumentParser, steps: int, n: int) -> None:
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=steps, help="number of sampling steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n", type=int, default=n, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")



def _add_cond_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class-labels", type=int, nargs="+", default=None, metavar="L",
                   help="class-conditional models: the class labels, cycled over the images (image i gets L[i %% len])")
    g.add_argument("--classes", choices=["all"], default=None,
                   help="class-conditional models: every class in turn (calibration defaults to this)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                   help="text-to-image pipelines: the prompt(s), cycled over the images")
    t.add_argument("--prompts", default=None, metavar="FILE", help="prompts from a file, one per line, cycled")
    t.add_argument("--embeddings", default=None, metavar="FILE",
                   help="precomputed text embeddings (safetensors: prompt_embeds (N, S, D), optionally "
                        "negative_prompt_embeds (1, S, D)), cycled; any text encoder")
    p.add_argument("--negative-prompt", default="", help="the prompt of guidance's unconditional half (default: empty)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance w (1 = none; default 7.5 for text-to-image pipelines, else 1); "
                        "needs the null class label the model was trained with, or a text encoder")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2024); 0 = off")
    p.add_argument("--guidance-interval", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply the guidance scale only at timesteps LO <= t <= HI (Kynkaanniemi et al. 2024), the "
                        "conditional prediction alone elsewhere (one UNet row instead of two); default: the model's "
                        "(trt_dm.json guidance_interval, shown by `trt-dm info`), else every timestep")
    p.add_argument("--null-label", type=int, default=None,
                   help="the model's null (unconditional) class label, when its directory does not name one")



def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timesteps", default="ndtc",
                   help="calibration timestep sampler: ndtc[:mu,sigma] (PTQ4DM; default mu=0.5, sigma=0.35), "
                        "uniform, single[:step], all")
    p.add_argument("--calib-n", type=int, default=256, help="calibration samples (PTQ4DM used 1024)")
    p.add_argument("--calib-sampler", default="ddim", help="FP sampler whose trajectories are recorded")
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--calib-prompts", default=None, metavar="FILE",
                   help="text-to-image pipelines: calibration prompts, one per line (default: trt_dm's built-in 141)")
    p.add_argument("--calib-embeddings", default=None, metavar="FILE",
                   help="a text UNet without its text encoder: calibrate on these prompt embeddings instead "
                        "(safetensors: prompt_embeds (N, S, D), SDXL also pooled_prompt_embeds (N, P); negative_* "
                        "for guidance)")
    p.add_argument("--format", default="int8", choices=("int8", "fp8"),
                   help="the 8-bit format of weights and activations: int8, or fp8 (E4M3; ranges for s = amax / 448 "
                        "from the same statistics; runs on GPUs with FP8: Ada, Hopper, Blackwell)")
    p.add_argument("--formats", default=None, metavar="auto|LIST",
                   help="search each layer's format under --budget: auto (int8, fp8, fp16) or a comma list such as "
                        "int8,fp16; as many MACs as possible in 8-bit formats, one graph (trt_dm.quant.search)")
    p.add_argument("--budget", type=float, default=None, metavar="E",
                   help="--formats: the relative MSE of the (guided) prediction vs FP the mix may reach on 64 "
                        "held-out calibration samples (the search prints the all-int8 and all-fp8 errors)")
    p.add_argument("--budget-on", default="step", choices=("step", "sampled"),
                   help="--formats: what --budget bounds: step (one prediction on held-out calibration x_t) or "
                        "sampled (16 held-out images sampled end to end vs FP's: error that compounds over the steps)")
    p.add_argument("--min-8bit-macs", type=float, default=0.0, metavar="SHARE",
                   help="--formats: fail (exit 1, saying what the best mix reached) unless at least this share of "
                        "the convolution and linear MACs is in 8-bit formats, e.g. 0.8")
    p.add_argument("--weight-bits", type=int, default=8, choices=(8, 7, 4),
                   help="4 = W4A8: 4-bit weights (exported on the int8 grid, integers in [-8, 7], for int8 engines); "
                        "7 = W7A8: integers in [-64, 63], for int8 CPU kernels without VNNI (AVX2 only), which "
                        "saturate on 8-bit weights (docs/deployment.md, OpenVINO)")
    p.add_argument("--w8-layers", nargs="+", default=None, metavar="PATTERN",
                   help="with --weight-bits 4 or 7: these layers' weights stay 8-bit (fnmatch on module names, e.g. "
                        "'down_blocks.0.*' 'up_blocks.2.*' for the first resolution of a three-level UNet)")
    p.add_argument("--smooth", type=float, default=0.0, metavar="ALPHA",
                   help="channel balancing (SmoothQuant) of the quantized linear and convolution layers with migration "
                        "strength ALPHA in (0, 1] (0.5 is SmoothQuant's default; 0: off): outlier input channels "
                        "move into the per-channel weight ranges; a Mul before each balanced layer's Q/DQ in the graph")
    p.add_argument("--smooth-layers", nargs="+", default=None, metavar="PATTERN",
                   help="with --smooth: balance only these layers (fnmatch on module names, e.g. '*.attn1.to_*' "
                        "'*.ff.net.*'); default all quantized linear and convolution layers")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "adaround"),
                   help="weight rounding: to nearest, or learned by block reconstruction against the FP model on "
                        "the calibration set (AdaRound; cached beside the statistics; under a groups=K recipe each "
                        "calibration row runs with its timestep group's ranges)")
    p.add_argument("--recon-iters", type=int, default=500,
                   help="--rounding adaround: Adam steps per block (W4A8 on the default model: 2000 gain 5.9 dB "
                        "over 500 at 4x the time; docs/quality.md)")
    p.add_argument("--recon-act-iters", type=int, default=0,
                   help="--rounding adaround: then learn each block's input ranges (LSQ) for this many Adam steps; "
                        "the learned ranges replace the recipe's (0 = keep the recipe's)")
    p.add_argument("--recon-temb", default="block", choices=("block", "separate"),
                   help="--rounding adaround: reconstruct the resnets' time-embedding projections in their resnet "
                        "(block) or first, all together on their own outputs (separate: TFMQ-DM's time block)")
    p.add_argument("--weight-calib", default="max", choices=("max", "mse"),
                   help="weight ranges per output channel: max = abs-max; mse = ModelOpt's data-free search for the "
                        "clip with the least squared weight error (matters for --weight-bits 4)")
    p.add_argument("--shortcut-split", action="store_true",
                   help="Q-Diffusion's split: separate ranges for the h / skip halves of up-path concatenations "
                        "(fake-quant only)")
    p.add_argument("--quantize-attention", action="store_true", help="also quantize the attention matmul inputs")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="layer name patterns kept in high precision, replacing the defaults "
                        "(trt_dm.quant.DEFAULT_EXCLUDE: UNets time_embedding.* conv_in conv_out; DiTs *.emb.* "
                        "pos_embed.proj proj_out_2)")
    p.add_argument("--keep-fp", nargs="+", default=(), metavar="PATTERN",
                   help="more layer name patterns kept in high precision, added to --exclude (or its defaults), "
                        "e.g. 'down_blocks.0.*' 'up_blocks.2.*'; `calibrate --sensitivity blocks` ranks the blocks")
    p.add_argument("--keep-fp-from-t", type=int, default=None, metavar="T",
                   help="the --keep-fp layers in FP only at the noisy steps t >= T, quantized below: two graphs / "
                        "engines switched by t (e.g. 500: the first resolution at the noisy half of the steps)")
    p.add_argument("--cache-dir", default="calib_cache")



def _openvino_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--openvino", nargs="+", default=None, metavar="GRAPH",
                   help="run this exported graph in OpenVINO on the CPU (e.g. the openvino / tensorrt target's "
                        "M-R.fp32.onnx: its Q/DQ layers run as int8 kernels; K graphs of a groups=K recipe are "
                        "switched by timestep); compiled once into a cache beside the graph (<stem>.ovcache/)")
    p.add_argument("--ov-precision", choices=("fp32", "bf16"), default="fp32",
                   help="with --openvino: precision of the non-quantized math (bf16 needs a CPU with native bf16, "
                        "AVX512_BF16 or AMX; elsewhere OpenVINO runs fp32 and says so). On int8 graphs bf16 was "
                        "1.31x faster on an AMX Xeon and 2.7 dB further from FP on the default model "
                        "(docs/performance.md)")
    p.add_argument("--ov-streams", type=int, default=None, metavar="K",
                   help="with --openvino: OpenVINO streams; a UNet call of >= K rows is split into K slices run at "
                        "once, smaller calls use all threads in one stream (default: 2 with >= 2 threads, else 1; "
                        "1 = one request on all threads)")



def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help="calibration recipe (see `trt-dm calibrate --help`; default ptq4dm-g4 in one graph, ptq4dm "
                        "for the ort-cpu target and for settings that take one range set)")
    p.add_argument("--target", choices=list(targets()), default="tensorrt",
                   help="; ".join(f"{n}: {t.help}" for n, t in targets().items()))
    p.add_argument("--ort-ops", choices=("layers", "all"), default="layers",
                   help="ort-cpu: quantize the recipe's Conv/Linear layers only (as TensorRT; default), or every "
                        "operator ONNX Runtime can (SiLU, residual adds, concat, softmax too): a study option, "
                        "measured no faster here and less accurate (see docs/performance.md)")
    p.add_argument("--out-dir", default="engines", help="where ONNX files, reports and engines go")
    p.add_argument("--one-graph", action="store_true",
                   help="tensorrt / openvino targets, groups=K recipes: ONE graph / engine whose layers pick their "
                        "input range per row by the timestep's group (exact to the K-range model up to rounding "
                        "flips); the tensorrt target's default for groups=K recipes (the openvino target's default "
                        "is K graphs: on a CPU the per-row scaling costs 20-30 %%, K graphs cost nothing per call)")
    p.add_argument("--group-engines", action="store_true",
                   help="tensorrt / openvino targets, groups=K recipes: K graphs / engines, one per timestep group "
                        "(switched by timestep at run time) instead of one")
    p.add_argument("--no-layer-comparison", action="store_true",
                   help="tensorrt target: skip the int8-code comparison of torch fake-quant and ONNX Runtime, layer "
                        "by layer (it needs about 3.4x the graph's size in memory: refused when that is not "
                        "available); the Q/DQ conformance and coverage checks still run")
    p.add_argument("--precision", choices=("fp16", "fp32"), default=None,
                   help="precision of the non-quantized math in the deployed graph (default: the target's; fp16 for "
                        "strongly typed TensorRT, the fp32 Q/DQ graph is always written too; fp32 for openvino)")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call during calibration")
    p.add_argument("--no-progress", action="store_true")
    _calib_args(p)



def _build_args(p: argparse.ArgumentParser) -> None:
    d = BuildOptions()
    p.add_argument("--flavour", choices=tuple(FLAVOURS), default=None,
                   help="TensorRT package to build with (default: tensorrt if importable, else tensorrt_rtx)")
    p.add_argument("--min-batch", type=int, default=d.min_batch)
    p.add_argument("--opt-batch", type=int, default=d.opt_batch)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--opt-level", type=int, default=d.opt_level, help="builder optimization level 0..5")
    p.add_argument("--timing-cache", default="engines/timing.cache", help="TensorRT timing cache file (not RTX)")
    p.add_argument("--rtx-targets", nargs="+", default=list(d.rtx_targets),
                   help="TensorRT-RTX compute-capability targets, e.g. SM86 SM89 SM120")
    p.add_argument("--workspace-mib", type=int, default=None,
                   help="builder workspace memory-pool limit in MiB (Jetson: its GPU shares the system memory)")



def _sample_command(sub) -> None:
    """`trt-dm sample`'s flags."""
    p = sub.add_parser("sample", help="draw images and write a grid")
    _add_model_args(p)
    _add_sampling_args(p, steps=50, n=64)
    _add_cond_args(p)
    p.add_argument("--out", default="grid.png", help="grid image path (.png/.jpg)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square)")
    p.add_argument("--save-samples", default=None, help="also write raw samples to this .safetensors file")
    p.add_argument("--onnx", nargs="+", default=None,
                   help="run this exported ONNX UNet in ONNX Runtime (CPU) instead of torch (K graphs of a groups=K "
                        "recipe are switched by timestep); --model still supplies the noise schedule and image shape")
    p.add_argument("--engine", nargs="+", default=None,
                   help="run this TensorRT / TensorRT-RTX engine (GPU); K plans of a groups=K recipe are "
                        "switched by timestep")
    p.add_argument("--cuda-graph", action="store_true", help="with --engine: replay the engine call as a CUDA graph")
    _openvino_args(p)


def _eval_command(sub) -> None:
    """`trt-dm eval`'s flags."""
    p = sub.add_parser("eval", help="FD-EffNet and KID of samples against Fashion-MNIST")
    _add_model_args(p)
    _add_sampling_args(p, steps=100, n=2000)
    _add_cond_args(p)
    p.add_argument("--ref", choices=("test", "train"), default="test", help="reference split")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--inception-weights", default=None,
                   help="local pytorch-fid Inception weights (.pth): report standard FID instead of FD-EffNet")
    p.add_argument("--out-dir", default="reports/eval", help="where result.json and grid.png go")
    p.add_argument("--recipe", default=None,
                   help="evaluate the fake-quant model calibrated with this recipe against FP (same seeds)")
    p.add_argument("--onnx", nargs="+", default=None,
                   help="evaluate this exported ONNX graph in ONNX Runtime (e.g. the ort-cpu int8 target) against FP; "
                        "several: the timestep groups / segments of one deployment, switched by t")
    p.add_argument("--eps-n", type=int, default=256,
                   help="images whose per-timestep noise-prediction error is measured (recipe runs)")
    _openvino_args(p)
    _calib_args(p)


def _calibrate_command(sub) -> None:
    """`trt-dm calibrate`'s flags."""
    p = sub.add_parser("calibrate", help="timestep-stratified calibration (PTQ4DM): statistics once, ranges per recipe")
    _add_model_args(p)
    p.add_argument("--recipe", default=None,
                   help="preset (ptq4dm-g4: the default; ptq4dm: the paper's, the default where the settings take "
                        "one range set; qdiffusion, max, percentile, entropy, minmean, meanmax) or METRIC@MERGE, e.g. "
                        "mse:2.4@pooled, percentile:99.9@uniform, max@groups=4")
    p.add_argument("--batch", type=int, default=64, help="images per UNet call")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sensitivity", nargs="?", const="layers", default=None, choices=("layers", "blocks"),
                   help="layers: one layer quantized at a time, the error of each half's prediction (decides the "
                        "default exclusion list); blocks: the model quantized as the other options say, one block "
                        "kept in FP at a time, the error of the prediction the sampler uses (guided with "
                        "--guidance-scale), with each block's share of the MACs (what to pass to --keep-fp)")
    _calib_args(p)
    _add_cond_args(p)


def _export_command(sub) -> None:
    """`trt-dm export`'s flags."""
    p = sub.add_parser("export", help="calibrate (cached) and export the fake-quant UNet to Q/DQ ONNX, checked")
    _add_model_args(p)
    _export_args(p)
    _add_cond_args(p)


def _build_command(sub) -> None:
    """`trt-dm build`'s flags."""
    p = sub.add_parser("build", help="build a TensorRT / TensorRT-RTX engine (+ sidecar) from an exported ONNX")
    p.add_argument("onnx")
    _build_args(p)


def _engine_command(sub) -> None:
    """`trt-dm engine`'s flags."""
    p = sub.add_parser("engine", help="calibrate -> export -> check -> build (what `make engine` runs)")
    _add_model_args(p)
    _export_args(p)
    _add_cond_args(p)
    _build_args(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the unquantized FP16 baseline engine")


def _profile_command(sub) -> None:
    """`trt-dm profile`'s flags."""
    p = sub.add_parser("profile", help="latency / throughput / memory of every runner available here")
    p.add_argument("--arch", action="append", default=None,
                   help="default (embedded model), ddpm-cifar10 (35.7 M), sd15-unet (860 M); repeatable")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling run (0: skip it)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--runners", nargs="*", default=None, help="only these runners (names as in the report)")
    p.add_argument("--engine", nargs="*", default=[], help="TensorRT engines to time too (GPU)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="class-conditional architectures: the sampling run uses classifier-free guidance (2 rows per "
                        "image per call); latency rows time UNet calls of the given batch")
    p.add_argument("--timesteps", choices=("same", "spread"), default="same",
                   help="the latency calls' rows: all at t=500 (a sampling loop's call; default), or spread over the "
                        "schedule (a service's mixed batch: a groups=K deployment of K graphs splits such a call)")
    p.add_argument("--out-dir", default="reports/profile")


def _serve_command(sub) -> None:
    """`trt-dm serve`'s flags."""
    p = sub.add_parser("serve", help="HTTP sampler service with step-level batching (FastAPI + uvicorn)")
    _add_model_args(p)
    p.add_argument("--onnx", nargs="+", default=None, help="serve this ONNX graph (K graphs of a groups=K recipe)")
    p.add_argument("--engine", nargs="+", default=None, help="serve this TensorRT engine (K plans of a groups=K recipe)")
    _openvino_args(p)
    p.add_argument("--ort-spin", action="store_true",
                   help="--onnx: let ONNX Runtime's threads busy-wait between UNet calls (its default; off here: "
                        "spinning threads slow the service's HTTP and PNG work, see BENCHMARKS.md)")
    p.add_argument("--recipe", default=None, help="serve the torch fake-quant model of this recipe (calibrated, cached)")
    p.add_argument("--device", default=None, help="torch device of the FP / fake-quant model")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=64, help="most rows per UNet call (a guided image takes 2)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most images waiting; more: 429 with Retry-After (a request for more images than this: 422)")
    p.add_argument("--batching", choices=("step", "request", "none"), default="step",
                   help="step: step-level continuous batching; request / none: the serving benchmark's baselines "
                        "(whole requests batched as they arrive; one request at a time)")
    p.add_argument("--max-n", type=int, default=64, help="most images per request")
    p.add_argument("--max-steps", type=int, default=1000, help="most sampler steps per request (and the schedule's)")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="largest request body in bytes (413 above)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request is cancelled (504)")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer / X-API-Key); or set "
                                                    "TRT_DM_API_KEY")
    p.add_argument("--null-label", type=int, default=None, help="the model's null class label, if not in trt_dm.json")
    p.add_argument("--ray", action="store_true",
                   help="deploy with Ray Serve: one step scheduler per replica, Ray's HTTP proxy, routing and "
                        "autoscaling (needs the [ray] extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (the minimum with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="with --ray: autoscale between --replicas and this many, on ongoing requests per replica")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="with --ray: CPUs Ray reserves per replica (default: --threads, or 1)")
    p.add_argument("--replica-gpus", type=float, default=None,
                   help="with --ray: GPUs per replica (default: 1 when serving engines or a CUDA device, else 0)")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: the Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--no-progress", action="store_true")
    _calib_args(p)
    p.set_defaults(guidance_scale=None, guidance_rescale=0.0, guidance_interval=None, class_labels=None, classes=None,
                   batch=64)


def _check_command(sub) -> None:
    """`trt-dm check`'s flags."""
    p = sub.add_parser("check", help="check a Q/DQ ONNX file against TensorRT's explicit-quantization rules")
    p.add_argument("onnx")


def _info_command(sub) -> None:
    """`trt-dm info`'s flags."""
    p = sub.add_parser("info", help="describe a model: class, parameters, inputs, fingerprint")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The `trt-dm` parser: global flags, then one subcommand per command (``args.command`` names it)."""
    parser = _Parser(prog="trt-dm", description="Post-training int8 quantization for "
                                     "diffusion UNets (PTQ4DM), deployed as TensorRT engines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO) and show tracebacks")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _sample_command(sub)
    _eval_command(sub)
    _calibrate_command(sub)
    _export_command(sub)
    _build_command(sub)
    _engine_command(sub)
    _profile_command(sub)
    _serve_command(sub)
    _check_command(sub)
    _info_command(sub)
    return parser


def parse_serve_args(serve_args) -> argparse.Namespace:
    """`trt-dm serve` flags (a string or a list) -> the parsed arguments, as the CLI parses them."""
    argv = shlex.split(serve_args) if isinstance(serve_args, str) else [str(a) for a in serve_args]
    return build_parser().parse_args(["serve", *argv])
