"""What GroupNorm costs OpenVINO's int8 graph on the CPU, and whether another ONNX form of it is cheaper (issue #40,
docs/performance.md "GroupNorm forms").

    python tools/groupnorm_forms.py [--arch ddpm-cifar10] [--batches 8 32] [--iters 8] [--out-dir DIR]

Exports the architecture (random weights) as the FP32 graph and the TensorRT-layout int8 Q/DQ graph (ranges from
random inputs, as `trt-dm profile` does), rewrites each GroupNorm of both (torch exports Reshape (N, G, -1),
InstanceNormalization, Reshape back, Mul gamma, Add beta) into:

- ``stats``: per-channel statistics, no reshape of the full tensor: ReduceMean of x and of x * x over the spatial
  axes, the group means from those (N, C) tensors, then ``x * a + b`` with per-sample, per-channel a and b;
- ``gnop``: ONNX GroupNormalization (opset 21, per-channel scale and bias), OpenVINO's own GroupNormalization op;
- ``none``: the normalisation left out (gamma and beta kept): not the model, a bound on what any form could gain.

Checks each FP32 variant against the original in ONNX Runtime (all but ``none`` must agree to 1e-4 relative), then
times every graph in OpenVINO through the project's runner (two threads, its default streams) in interleaved rounds,
FP32 math and, on CPUs with native bf16, bf16 math. Prints a table of medians (ms per UNet call).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trt_dm.core.cpu import cpu_int8_isa  # noqa: E402
from trt_dm.eval.profile import _observed_amax, feed_for, machine  # noqa: E402
from trt_dm.export.onnx import export_onnx  # noqa: E402
from trt_dm.models.builders import build_arch  # noqa: E402
from trt_dm.quant.config import QuantConfig  # noqa: E402
from trt_dm.quant.modules import apply_ranges, quantize_model  # noqa: E402
from trt_dm.runtime.openvino import OpenVinoRunner  # noqa: E402

FORMS = ("stats", "gnop", "none")


def _groupnorms(model) -> list[dict]:
    """Each exported GroupNorm: its nodes, input, output, groups, epsilon, gamma, beta and the input's rank."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    def const(name: str) -> np.ndarray:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = prod[name]
        return const(node.input[0]) if node.op_type == "Identity" else numpy_helper.to_array(node.attribute[0].t)

    rank = {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(g.input)}
    found = []
    for norm in [n for n in g.node if n.op_type == "InstanceNormalization"]:
        r1 = prod[norm.input[0]]
        r2 = cons[norm.output[0]][0]
        mul = cons[r2.output[0]][0]
        add = cons[mul.output[0]][0]
        if (r1.op_type, r2.op_type, mul.op_type, add.op_type) != ("Reshape", "Reshape", "Mul", "Add"):
            raise ValueError(f"{norm.name}: not the GroupNorm pattern torch exports")
        gamma = const(next(i for i in mul.input if i != r2.output[0])).reshape(-1).astype(np.float32)
        beta = const(next(i for i in add.input if i != mul.output[0])).reshape(-1).astype(np.float32)
        found.append({"nodes": [r1, norm, r2, mul, add], "x": r1.input[0], "y": add.output[0],
                      "groups": int(const(r1.input[1])[1]),
                      "eps": next(a.f for a in norm.attribute if a.name == "epsilon"),
                      "gamma": gamma, "beta": beta, "rank": rank[r1.input[0]]})
    return found


def _stats_nodes(gn: dict, p: str, add_const) -> list:
    """``stats`` form of one GroupNorm: y = x * a + b from per-channel means of x and x * x."""
    from onnx import helper
    x, c, groups, r = gn["x"], gn["gamma"].size, gn["groups"], gn["rank"]
    spatial, chan = list(range(2, r)), [1, c] + [1] * (r - 2)
    mk = helper.make_node
    nodes = [mk("ReduceMean", [x], [p + "m1"], keepdims=1, axes=spatial),
             mk("Mul", [x, x], [p + "xx"]), mk("ReduceMean", [p + "xx"], [p + "m2"], keepdims=1, axes=spatial)]
    grouped = add_const(p + "gs", np.array([0, groups, -1], np.int64))
    for m in ("m1", "m2"):  # (N, C, 1...) -> (N, G, 1): the group's mean of x and of x * x
        nodes += [mk("Reshape", [p + m, grouped], [p + m + "g"]),
                  mk("ReduceMean", [p + m + "g"], [p + m + "G"], keepdims=1, axes=[2])]
    nodes += [mk("Mul", [p + "m1G", p + "m1G"], [p + "mu2"]), mk("Sub", [p + "m2G", p + "mu2"], [p + "var"]),
              mk("Add", [p + "var", add_const(p + "eps", np.array(gn["eps"], np.float32))], [p + "ve"]),
              mk("Sqrt", [p + "ve"], [p + "sd"]), mk("Reciprocal", [p + "sd"], [p + "inv"])]
    ones = add_const(p + "ones", np.ones((1, groups, c // groups), np.float32))
    per_channel = add_const(p + "cs", np.array([0, c] + [1] * (r - 2), np.int64))
    for m in ("inv", "m1G"):  # (N, G, 1) -> (N, C, 1...)
        nodes += [mk("Mul", [p + m, ones], [p + m + "b"]), mk("Reshape", [p + m + "b", per_channel], [p + m + "c"])]
    nodes += [mk("Mul", [p + "invc", add_const(p + "gamma", gn["gamma"].reshape(chan))], [p + "a"]),
              mk("Mul", [p + "m1Gc", p + "a"], [p + "ma"]),
              mk("Sub", [add_const(p + "beta", gn["beta"].reshape(chan)), p + "ma"], [p + "b"]),
              mk("Mul", [x, p + "a"], [p + "xa"]), mk("Add", [p + "xa", p + "b"], [gn["y"]])]
    return nodes


def rewrite(src: Path, dst: Path, form: str) -> int:
    """``src`` with every GroupNorm in ``form`` (module docstring) at ``dst``; returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(src))
    g = model.graph
    found = _groupnorms(model)

    def add_const(name: str, value: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(value, name))
        return name

    replaced: dict[int, list] = {}
    dropped: set[int] = set()
    for k, gn in enumerate(found):
        r1, norm, r2, mul, add = gn["nodes"]
        p = f"gnform{k}_"
        if form == "stats":
            new = _stats_nodes(gn, p, add_const)
        elif form == "gnop":
            new = [helper.make_node("GroupNormalization", [gn["x"], add_const(p + "s", gn["gamma"]),
                                                           add_const(p + "b", gn["beta"])], [gn["y"]],
                                    num_groups=gn["groups"], epsilon=gn["eps"])]
        else:  # none: gamma * x + beta
            new = [helper.make_node("Mul", [gn["x"], add_const(p + "s", gn["gamma"].reshape(
                       [1, -1] + [1] * (gn["rank"] - 2)))], [p + "xs"]),
                   helper.make_node("Add", [p + "xs", add_const(p + "b", gn["beta"].reshape(
                       [1, -1] + [1] * (gn["rank"] - 2)))], [gn["y"]])]
        replaced[id(add)] = new
        dropped |= {id(r1), id(norm), id(r2), id(mul)}
    nodes = [m for n in g.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    if form == "gnop":  # GroupNormalization with per-channel scale and bias: opset 21
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 21)
    onnx.save(model, str(dst))
    return len(found)


def check(reference: Path, graph: Path, batch: int = 2) -> float:
    """Relative RMS difference of ``graph``'s output from ``reference``'s in ONNX Runtime (random inputs)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32),
            "timestep": np.array([10, 900][:batch], np.int64)}
    a = ort.InferenceSession(str(reference), so).run(None, feed)[0]
    b = ort.InferenceSession(str(graph), so).run(None, feed)[0]
    return float(np.sqrt(((a - b) ** 2).mean() / (a ** 2).mean()))


def time_graphs(graphs: dict[str, Path], batch: int, precision: str, iters: int, shape) -> dict[str, float]:
    """Median ms of one call per graph, interleaved rounds, the project's OpenVINO runner (2 threads)."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    feed = {"sample": x, "timestep": torch.full((batch,), 500, dtype=torch.long)}
    times: dict[str, list[float]] = {k: [] for k in graphs}
    with contextlib.ExitStack() as stack:
        runners = {k: stack.enter_context(OpenVinoRunner(p, threads=2, precision=precision, cache_dir=False))
                   for k, p in graphs.items()}
        for r in runners.values():
            for _ in range(3):
                r.infer(feed)
        for _ in range(iters):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r.infer(feed)
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ddpm-cifar10")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the graphs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = machine()
    print(f"CPU: {m['cpu']}, int8: {cpu_int8_isa()}, flags: {' '.join(m['cpu_flags'])}")
    with tempfile.TemporaryDirectory() as tmp:
        d = args.out_dir or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        unet, _ = build_arch(args.arch)
        feeds = [feed_for(unet, 2, seed=i) for i in range(2)]
        q = quantize_model(copy.deepcopy(unet), QuantConfig())
        apply_ranges(q, _observed_amax(q, feeds))
        base = {"fp32": export_onnx(unet, d / "fp32.onnx"), "int8": export_onnx(q, d / "int8.onnx")}
        graphs = dict(base)
        for kind, src in base.items():
            for form in FORMS:
                n = rewrite(src, d / f"{kind}-{form}.onnx", form)
                graphs[f"{kind}-{form}"] = d / f"{kind}-{form}.onnx"
            print(f"{kind}: {n} GroupNorms rewritten")
        for form in FORMS:
            err = check(base["fp32"], graphs[f"fp32-{form}"])
            print(f"fp32-{form}: relative RMS difference from the exported graph in ONNX Runtime {err:.2e}")
            if form != "none" and err > 1e-4:
                raise SystemExit(f"fp32-{form} does not compute the model ({err:.2e})")
        shape = tuple(feed_for(unet, 1)["sample"].shape[1:])
        import openvino as ov
        bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        precisions = ["fp32"] + (["bf16"] if bf16 else [])
        print("\n| math | batch | " + " | ".join(graphs) + " |\n|---|---:|" + "---:|" * len(graphs))
        for precision in precisions:
            for b in args.batches:
                ms = time_graphs(graphs, b, precision, args.iters, shape)
                print(f"| {precision} | {b} | " + " | ".join(f"{ms[k]:.1f}" for k in graphs) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
