"""Learned weight rounding by block reconstruction (AdaRound, Nagel et al. 2020; BRECQ's blocks, Li et al. 2021;
as Q-Diffusion applies them to diffusion UNets).

Each weight w of a quantized layer, with its per-output-channel step s (from the weight quantizer's amax), is
rounded down or up by a learned variable v instead of to nearest:

    w_q = s * clamp(floor(w / s) + h(v), qmin, qmax),   h(v) = clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)

v starts where h(v) = frac(w / s) and is trained, one block at a time in forward order, to make the quantized
block's output match the FP block's on the calibration set:

    loss = mean (block_q(x_q) - block_fp(x_fp))^2 + lambda * sum (1 - |2 h(v) - 1|^beta)

x_q are the block's inputs in the already-reconstructed quantized model (activation quantizers on, with the
recipe's ranges), x_fp the FP model's, both from the same calibration x_t. beta anneals from 20 to 2 after a warm-up,
pushing every h(v) to 0 or 1; the rounding is then made hard and folded into the stored weight, which lies
exactly on the quantizer's grid, so export, checks and engines are the standard Q/DQ path (and W4 weights go on
the int8 grid as usual). Blocks: each ResnetBlock2D (with its time-embedding projection), each attention block
(diffusers ``Attention`` / ``Transformer2DModel``); every other quantized layer on its own. With ``temb="separate"``
the resnets' time-embedding projections (``time_emb_proj``) leave their resnets and are reconstructed first, all of
them as one unit on their own outputs, as TFMQ-DM treats the time-information path: their inputs depend on the
timestep (and label) only, so x_t plays no part in their rounding.

Optional activation step-size refinement (``act_iters`` > 0, as BRECQ / Q-Diffusion follow the rounding with it):
with the block's rounding fixed, the input range of each of its layers is learned on the same loss (without the
regulariser), LSQ-style (Esser et al. 2020): amax = amax0 * exp(u), rounding with a straight-through gradient, so
the loss reaches u through the step and the clipping. The learned ranges replace the recipe's for those layers
(per-tensor scales, so the graph is still the standard Q/DQ export); later blocks see them.

Timestep-dependent activation ranges (a ``groups=K`` recipe, ``set_group``): every calibration row is run with the
range set of its timestep's group, as the deployed graph runs it (one set of weights, K range sets switched by t), both
where the blocks' inputs are captured and in the block loss; each training step draws its rows from one group (the
group of a uniformly drawn row, so groups weigh by their rows as in the ungrouped loss). Input-range refinement
learns one range per layer, so it needs one range set.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trt_dm.core.io import atomic_write
from trt_dm.quant.config import RECON_TEMB
from trt_dm.quant.modules import quantized_layers

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
_SDPA = torch.nn.functional.scaled_dot_product_attention  # the original (modelopt swaps it inside attention calls)
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "Transformer2DModel")


@dataclass(frozen=True)
class ReconConfig:
    iters: int = 500          # Adam steps per block
    batch: int = 32           # calibration rows per step
    lr: float = 1e-3          # Adam on the rounding variables
    reg: float = 0.01         # lambda of the rounding regulariser
    warmup: float = 0.2       # share of the steps without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0
    act_iters: int = 0        # Adam steps on the block's input ranges after its rounding (0: the recipe's ranges)
    act_lr: float = 5e-3      # Adam on u, amax = amax0 * exp(u)
    temb: str = "block"       # the time_emb_proj layers: in their resnet ("block") or first, on their own ("separate")

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch < 1 or self.act_iters < 0:
            raise ValueError(f"reconstruction needs iters >= 1, batch >= 1 and act_iters >= 0, got {self.iters}, "
                             f"{self.batch}, {self.act_iters}")
        if self.temb not in RECON_TEMB:
            raise ValueError(f"temb must be one of {', '.join(RECON_TEMB)}, got {self.temb!r}")

    def key(self) -> str:
        d = asdict(self)
        if not self.act_iters:  # without refinement, the key of the weights cached before it existed
            del d["act_iters"], d["act_lr"]
        if self.temb == "block":  # likewise
            del d["temb"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class _AdaRound(nn.Module):
    """The parametrisation w -> s * clamp(floor(w / s) + h(v), qmin, qmax) of one layer's weight."""

    def __init__(self, w: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.register_buffer("step", step.reshape(shape).to(w.dtype))
        self.register_buffer("floor", torch.floor(w / self.step))
        self.qmin, self.qmax, self.hard = qmin, qmax, False
        rest = (w / self.step - self.floor).clamp(1e-4, 1 - 1e-4)  # h(v0) = frac(w / s)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, _w: torch.Tensor | None) -> torch.Tensor:
        up = (self.v >= 0).to(self.step.dtype) if self.hard else self.h()
        return self.step * (self.floor + up).clamp(self.qmin, self.qmax)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _LearnedRange(nn.Module):
    """A layer's per-tensor input fake-quant with a learned range: amax = amax0 * exp(u), the quantizer's integer
    bounds, round to nearest with a straight-through gradient (LSQ's estimator: the loss reaches u through the
    step and through the clipped values)."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.register_buffer("amax0", q.amax.detach().float().clone())
        self.u = nn.Parameter(torch.zeros_like(self.amax0))
        self.qmax = q.maxbound
        self.qmin = 0 if q.unsigned else (-q.maxbound if q.narrow_range else -q.maxbound - 1)

    def amax(self) -> torch.Tensor:
        return self.amax0 * torch.exp(self.u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.amax() / self.qmax
        v = x / step
        return (v + (torch.round(v) - v).detach()).clamp(self.qmin, self.qmax) * step


def blocks_in_order(qunet: nn.Module, run: Callable[[], None]) -> list[tuple[str, nn.Module, list[str]]]:
    """[(name, module, [its quantized layers])] for every reconstruction unit, in the order a forward pass
    (``run``) first enters them: blocks of BLOCK_TYPES holding quantized layers, then each quantized layer outside
    them on its own."""
    layers = quantized_layers(qunet)
    modules = dict(qunet.named_modules())
    blocks = {n: m for n, m in modules.items()  # (modelopt's converted classes subclass diffusers')
              if any(c.__name__ in BLOCK_TYPES for c in type(m).__mro__)}
    # outermost blocks only (a Transformer2DModel holds Attention modules)
    blocks = {n: m for n, m in blocks.items() if not any(n.startswith(o + ".") for o in blocks)}
    units: dict[str, list[str]] = {n: [] for n in blocks}
    for layer in layers:
        owner = next((b for b in blocks if layer.startswith(b + ".")), None)
        units.setdefault(owner or layer, []).append(layer)
    units = {n: ls for n, ls in units.items() if ls}
    order: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda *_a, n=n: order.append(n) if n not in order else None)
               for n in units]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in units if n not in order]
    if missing:
        raise RuntimeError(f"reconstruction units never run by the forward pass: {missing[:5]}")
    return [(n, modules[n], units[n]) for n in order]


TEMB_UNIT = "time_emb_proj"  # the name of the unit of all time-embedding projections (temb="separate")


class _Together(nn.Module):
    """Layers that do not feed each other, as one unit: their outputs, flattened per row, side by side."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x).flatten(1) for m, x in zip(self.layers, xs)], 1)


def separate_temb(units: list[tuple[str, nn.Module, list[str]]], q_modules: dict[str, nn.Module]
                  ) -> list[tuple[str, nn.Module, list[str]]]:
    """The units with every ``*.time_emb_proj`` layer taken out of its block and put, all together, first."""
    temb = [layer for _n, _m, layers in units for layer in layers if layer.rsplit(".", 1)[-1] == "time_emb_proj"]
    if not temb:
        return units
    rest = [(n, m, [ly for ly in layers if ly not in temb]) for n, m, layers in units]
    return [(TEMB_UNIT, _Together([q_modules[ly] for ly in temb]), temb), *[u for u in rest if u[2]]]


def _capture(model: nn.Module, modules: list[nn.Module], batches, output: bool,
             before: Callable[[int], None] | None = None) -> list[list]:
    """Inputs (args, kwargs) or the output of each of ``modules`` for each batch, in one pass of ``model`` over
    ``batches`` (``before(i)`` called ahead of batch i): one list per module."""
    got: list[list] = [[] for _ in modules]

    def hook(k, args, kwargs, out=None):
        if output:
            got[k].append(_first(out).detach())
        else:
            got[k].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                           {key: v.detach() if torch.is_tensor(v) else v for key, v in kwargs.items()}))

    handles = [m.register_forward_hook(lambda _m, a, kw, o, k=k: hook(k, a, kw, o), with_kwargs=True) if output else
               m.register_forward_pre_hook(lambda _m, a, kw, k=k: hook(k, a, kw), with_kwargs=True)
               for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for i, (x, t, c) in enumerate(batches):
                if before is not None:
                    before(i)
                model(x, t, **c)
    finally:
        for h in handles:
            h.remove()
    return got


def _first(out):
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _collate(items: list, sizes: list[int]):
    """One batch-first tensor per captured value over all batches (values that are not per row kept once)."""
    def cat(parts):
        if all(torch.is_tensor(p) and p.dim() > 0 and p.shape[0] == k for p, k in zip(parts, sizes)):
            return torch.cat(parts)
        return parts[0]  # not batched (None, a scalar, a flag)
    if torch.is_tensor(items[0]):
        return cat(items)
    args = tuple(cat([it[0][k] for it in items]) for k in range(len(items[0][0])))
    return args, {k: cat([it[1][k] for it in items]) for k in items[0][1]}


def _rows(value, idx: torch.Tensor, n: int):
    """Rows ``idx`` of a collated capture (tensors with n rows are indexed, anything else passed as is)."""
    def take(v):
        return v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
    if torch.is_tensor(value):
        return take(value)
    args, kwargs = value
    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def _sdpa_for_training(self, query, key, value, *args, **kwargs):
    """modelopt's quantized attention without its export-only FP8SDPA autograd function (which has no backward):
    the same q / k / v fake-quant (straight-through gradients), then torch's SDPA."""
    return _SDPA(
        self.q_bmm_quantizer(query), self.k_bmm_quantizer(key), self.v_bmm_quantizer(value), *args, **kwargs)


@contextlib.contextmanager
def _trainable_attention(qunet: nn.Module):
    patched = []
    for m in qunet.modules():
        table = getattr(m, "_functionals_to_replace", None)
        if table and any(name == "scaled_dot_product_attention" for _p, name, _f in table):
            m._functionals_to_replace = [(p, name, _sdpa_for_training if name == "scaled_dot_product_attention" else f)
                                         for p, name, f in table]
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m._functionals_to_replace  # back to the class's table


def reconstruct(qunet: nn.Module, fp_unet: nn.Module, batches: list, cfg: ReconConfig = ReconConfig(),
                progress: bool = True, *, batch_groups: list[int] | None = None,
                set_group: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Learn the rounding of every quantized layer's weight in ``qunet`` (a calibrated fake-quant model) block
    by block against ``fp_unet`` on ``batches`` ([(x, t, conditioning)], as the UNet is called). The hard
    rounding is folded into ``qunet``'s weights in place (on the quantizers' grids; the weight quantizers stay on
    and reproduce them exactly). With ``cfg.act_iters``, each block's per-tensor input ranges are then learned
    and set in ``qunet``'s quantizers. With timestep-grouped ranges, ``batch_groups`` gives each batch's group (every
    batch within one group) and ``set_group(k)`` puts range set k into ``qunet``. Returns ({layer: rounded weight},
    {layer: learned input amax}; empty without ``act_iters``) and logs each block's error before / after."""
    from tqdm.auto import tqdm
    qunet.eval()
    fp_unet.eval()
    for p in [*qunet.parameters(), *fp_unet.parameters()]:  # only the rounding variables learn
        p.requires_grad_(False)
    sizes = [b[0].shape[0] for b in batches]
    n = sum(sizes)
    grouped = _RowGroups(sizes, batch_groups, set_group, cfg.act_iters) if batch_groups is not None else None
    units = blocks_in_order(qunet, lambda: qunet(*batches[0][:2], **batches[0][2]))
    fp_modules, q_modules = dict(fp_unet.named_modules()), dict(qunet.named_modules())
    if cfg.temb == "separate":
        units = separate_temb(units, q_modules)
    g = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, torch.Tensor] = {}
    act_amax: dict[str, float] = {}
    bar = tqdm(units, desc="reconstruction", unit="block", disable=not progress)
    for name, block, layers in bar:
        before_batch = grouped.before_batch if grouped else None
        inputs, target = _block_io(qunet, fp_unet, (q_modules, fp_modules), name, block, layers, batches, sizes,
                                   before_batch)
        params, quantizers = _attach_rounding([q_modules[layer] for layer in layers])
        warm = int(cfg.warmup * cfg.iters)

        def block_loss(idx):
            if grouped is None:
                args, kwargs = _rows(inputs, idx, n)
                return (_first(block(*args, **kwargs)) - _rows(target, idx, n)).pow(2).mean()
            total = 0.0
            for _k, rows in grouped.split(idx):  # each row with its group's ranges; the mean over all rows
                args, kwargs = _rows(inputs, rows, n)
                total = total + (_first(block(*args, **kwargs)) - _rows(target, rows, n)).pow(2).sum()
            return total / (len(idx) * target[0].numel())

        with torch.no_grad():
            probe = torch.randperm(n, generator=g)[:min(n, 4 * cfg.batch)]
            for p in params:
                p.hard = True
            before = block_loss(probe).item()  # round to nearest-from-init is h(v0)>=0.5: the nearest rounding
            for p in params:
                p.hard = False

        def rounding_penalty(i):  # AdaRound's regulariser after the warm-up, beta annealed (cosine) high -> low
            if i < warm:
                return None
            frac = (i - warm) / max(1, cfg.iters - warm)
            beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * frac))
            return cfg.reg * sum(p.regulariser(beta) for p in params)

        _train(block, [p.v for p in params], cfg.lr, cfg.iters, block_loss, n, g, cfg.batch, rounding_penalty,
               draw=grouped.draw if grouped else None)
        with torch.no_grad():
            for p in params:
                p.hard = True
            after = block_loss(probe).item()
            for layer, p, q in zip(layers, params, quantizers):  # fold the hard rounding, restore the quantizer
                out[layer] = _fold_rounding(q_modules[layer], p, q)
        if cfg.act_iters:
            after = _refine_ranges(block, layers, q_modules, block_loss, probe, n, g, cfg, act_amax)
        log.info("reconstructed %s (%d layers): block MSE %.3g -> %.3g", name, len(layers), before, after)
        bar.set_postfix_str(f"{name}: {before:.2g}->{after:.2g}")
    return out, act_amax


def _block_io(qunet: nn.Module, fp_unet: nn.Module, modules: tuple[dict, dict], name: str, block: nn.Module,
              layers: list[str], batches: list, sizes: list[int], before_batch) -> tuple:
    """(the unit's inputs in the quantized model, its FP outputs) over every calibration row. The time-embedding
    unit (``TEMB_UNIT``): each of its layers' own inputs and outputs, side by side. ``modules``: both models'
    modules by name."""
    q_modules, fp_modules = modules
    if name == TEMB_UNIT:
        ins = _capture(qunet, [q_modules[ly] for ly in layers], batches, output=False, before=before_batch)
        inputs = (tuple(_collate(got, sizes)[0][0] for got in ins), {})
        outs = _capture(fp_unet, [fp_modules[ly] for ly in layers], batches, output=True)
        return inputs, torch.cat([_collate(got, sizes).flatten(1) for got in outs], 1)
    inputs = _collate(_capture(qunet, [block], batches, output=False, before=before_batch)[0], sizes)
    return inputs, _collate(_capture(fp_unet, [fp_modules[name]], batches, output=True)[0], sizes)


def _attach_rounding(modules: list[nn.Module]) -> tuple[list[_AdaRound], list[nn.Module]]:
    """Swap each layer's weight quantizer for a learned rounding on the same grid: (roundings, the quantizers)."""
    params, quantizers = [], []
    for m in modules:
        q = m.weight_quantizer
        step = q.amax.detach().float().reshape(-1) / q.maxbound
        qmin = -q.maxbound if q.narrow_range else -q.maxbound - 1
        ada = _AdaRound(m._parameters["weight"].detach(), step, qmin, q.maxbound)
        m.weight_quantizer = ada
        params.append(ada)
        quantizers.append(q)
    return params, quantizers


def _fold_rounding(m: nn.Module, rounding: _AdaRound, quantizer: nn.Module) -> torch.Tensor:
    """Store the hard rounding as the layer's weight and put its quantizer back; returns the rounded weight."""
    w = rounding(None)
    m._parameters["weight"].copy_(w)
    m.weight_quantizer = quantizer
    return w.clone()


def _train(block, variables, lr: float, iters: int, block_loss, n: int, g: torch.Generator, batch: int,
           penalty: Callable[[int], torch.Tensor | None] | None = None,
           draw: Callable[[torch.Generator, int], torch.Tensor] | None = None) -> None:
    """Adam on ``variables`` for ``iters`` steps of ``block_loss`` on random row batches drawn from ``g`` (by
    ``draw(g, batch)`` where given; plus ``penalty(step)`` where it returns a term): the loop the rounding and the
    input ranges both learn by."""
    opt = torch.optim.Adam(variables, lr=lr)
    with _trainable_attention(block):
        for i in range(iters):
            idx = draw(g, batch) if draw is not None else torch.randint(0, n, (min(batch, n),), generator=g)
            loss = block_loss(idx)
            extra = penalty(i) if penalty is not None else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


class _RowGroups:
    """The timestep group of every calibration row (``batch_groups``: one per batch) and the range set in force
    (``set_group`` called only when it changes)."""

    def __init__(self, sizes: list[int], batch_groups: list[int], set_group: Callable[[int], None] | None,
                 act_iters: int) -> None:
        if set_group is None or len(batch_groups) != len(sizes):
            raise ValueError(f"grouped reconstruction needs set_group and one group per batch ({len(sizes)} batches, "
                             f"{len(batch_groups)} groups)")
        if act_iters:
            raise ValueError("input-range refinement (act_iters) learns one range per layer: it needs one range set, "
                             "not timestep groups")
        self.batch_groups, self.set_group, self.current = list(batch_groups), set_group, None
        self.row = torch.cat([torch.full((s,), k, dtype=torch.int64) for s, k in zip(sizes, batch_groups)])
        self.members = {k: torch.nonzero(self.row == k).flatten() for k in sorted(set(self.batch_groups))}

    def use(self, k: int) -> None:
        if k != self.current:
            self.set_group(k)
            self.current = k

    def before_batch(self, i: int) -> None:
        self.use(self.batch_groups[i])

    def split(self, idx: torch.Tensor):
        """(group, the rows of ``idx`` in it) for each group present, that group's ranges put in force first."""
        groups = self.row[idx]
        for k in torch.unique(groups).tolist():
            self.use(k)
            yield k, idx[groups == k]

    def draw(self, g: torch.Generator, batch: int) -> torch.Tensor:
        """A training batch from one group: the group of a uniformly drawn row, rows uniform within it."""
        k = int(self.row[torch.randint(0, len(self.row), (1,), generator=g)])
        rows = self.members[k]
        return rows[torch.randint(0, len(rows), (min(batch, len(rows)),), generator=g)]


def _refine_ranges(block, layers, q_modules, block_loss, probe, n, g, cfg: ReconConfig, act_amax: dict) -> float:
    """Learn the per-tensor input ranges of ``block``'s layers (weights fixed) on ``block_loss``; set them in the
    quantizers, record them in ``act_amax`` and return the block's probe loss with them."""
    learned = {}
    for layer in layers:
        q = q_modules[layer].input_quantizer
        if q.amax is None or q.amax.numel() != 1:  # per-channel (shortcut split) ranges stay the recipe's
            continue
        learned[layer] = (_LearnedRange(q), q)
        q_modules[layer].input_quantizer = learned[layer][0]
    if not learned:
        with torch.no_grad():
            return block_loss(probe).item()
    try:
        _train(block, [r.u for r, _ in learned.values()], cfg.act_lr, cfg.act_iters, block_loss, n, g, cfg.batch)
    finally:
        for layer, (r, q) in learned.items():
            with torch.no_grad():
                q.amax = r.amax().detach().to(q.amax.dtype).reshape(q.amax.shape)
            q_modules[layer].input_quantizer = q
            act_amax[layer] = float(q.amax)
    with torch.no_grad():
        return block_loss(probe).item()


def save_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save

    return atomic_write(path, save({k: v.contiguous() for k, v in weights.items()},
                                   {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}))


def learned_input_amax(path: Path) -> dict[str, float]:
    """The input ranges learned with the rounding (``act_iters``), from the weights file's metadata (checked as
    ranges where they are used: ``RangeSet`` refuses a value that is not finite and > 0)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "input_amax" not in meta:
        raise ValueError(f"{path}: no learned input ranges in this reconstruction (made without act_iters)")
    return json.loads(meta["input_amax"])


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def apply_weights(qunet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put reconstructed weights into a fake-quant model (names and shapes must match its quantized layers)."""
    layers = quantized_layers(qunet)
    if set(weights) != set(layers):
        raise ValueError(f"reconstructed weights cover other layers than the model's quantized layers "
                         f"(missing {sorted(set(layers) - set(weights))[:3]}, unknown {sorted(set(weights) - set(layers))[:3]})")
    with torch.no_grad():
        for name, m in layers.items():
            if m.weight.shape != weights[name].shape:
                raise ValueError(f"{name}: reconstructed weight shape {tuple(weights[name].shape)} != {tuple(m.weight.shape)}")
            m.weight.copy_(weights[name])
