"""How `trt-dm engine`'s time and memory grow with the UNet's size: the scale runs' stage tables as one table and a
plot (docs/performance.md, docs/cost_growth.png).

    python tools/scale_run.py --arch default ; ... --arch ddpm-cifar10 ; --arch dit-xl-2 ; --arch sd15 ; --arch sdxl ;
        --arch sd3-medium ; --arch pixart-sigma
    python tools/cost_growth.py [--write]      # print the table; --write: into docs/performance.md + the plot

Reads reports/scale/<arch>/result.json (written by tools/scale_run.py: the same small calibration set at every
scale). A run that stopped (a stage refused for memory, exit 1) shows how far it got and the error.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("default", "ddpm-cifar10", "pixart-sigma", "dit-xl-2", "sd15", "sd3-medium", "sdxl")
GROUPS = ("calibration", "export", "baseline", "build")
DOC, PLOT = ROOT / "docs" / "performance.md", ROOT / "docs" / "cost_growth.png"
BEGIN, END = "<!-- cost-growth:begin -->", "<!-- cost-growth:end -->"


def load() -> list[dict]:
    """Each arch's last run; when it reused cached statistics, the calibration stages of an earlier run of the same
    arch that collected them (reports/scale/<arch>/<run>/result.json), said in the row."""
    runs = []
    for arch in ARCHS:
        f = ROOT / "reports" / "scale" / arch / "result.json"
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        if not (d.get("unet_params") and d.get("stages")):
            continue
        run = {"arch": arch, **d}
        if not _collected(d):
            for earlier in sorted(f.parent.glob("*/result.json")):
                e = json.loads(earlier.read_text())
                if e.get("stages") and _collected(e):
                    run["calibration_from"] = {"run": earlier.parent.name, "stages": [
                        s for s in e["stages"]["stages"] if s["stage"].startswith("calibration")]}
                    break
        runs.append(run)
    return runs


def _collected(result: dict) -> bool:
    return any(s["stage"] == "calibration: FP trajectories" for s in result["stages"]["stages"])


def groups(run: dict) -> dict[str, tuple[float, float]]:
    """{stage group: (wall s, peak resident GiB)} of a run's top-level stages."""
    out = {}
    stages = run["stages"]["stages"]
    if "calibration_from" in run:
        stages = run["calibration_from"]["stages"] + [s for s in stages if not s["stage"].startswith("calibration")]
    for s in stages:
        name = s["stage"]
        key = "baseline" if name.startswith("baseline") else name if name in GROUPS else None
        if key:
            w, m = out.get(key, (0.0, 0.0))
            out[key] = (w + s["seconds"], max(m, s["peak_rss_mb"] / 1024))
    return out


def table(runs: list[dict]) -> str:
    head = ("| model | parameters | " + " | ".join(f"{g} s / GiB" for g in GROUPS)
            + " | total s | peak GiB | exit | options |")
    lines = [head, "|" + "---|" * (len(GROUPS) + 6)]
    for r in runs:
        g = groups(r)
        cells = [f"{g[k][0]:.0f} / {g[k][1]:.1f}" if k in g else "-" for k in GROUPS]
        peak = max(v[1] for v in g.values()) if g else 0.0
        err = r["stages"].get("error")
        status = "0" if r["exit"] == 0 else f"{r['exit']}: {err.split(':')[0] if err else 'failed'}"
        total = sum(v[0] for v in g.values())
        note = f" (calibration: run `{r['calibration_from']['run']}`)" if "calibration_from" in r else ""
        lines.append(f"| {r['arch']}{note} | {r['unet_params'] / 1e6:,.1f} M | " + " | ".join(cells)
                     + f" | {total:.0f} | {peak:.1f} | {status} | {options(r['command'])} |")
    return "\n".join(lines)


def options(command: str) -> str:
    """The run's flags that skip or change a stage (the defaults run every check and the FP16 graphs)."""
    words = command.split()
    picked = [w for w in ("--no-layer-comparison", "--no-baseline") if w in words]
    if "--precision" in words:
        picked.append("--precision " + words[words.index("--precision") + 1])
    return " ".join(f"`{w}`" for w in picked) or "defaults"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in GROUPS:
        pts = [(r["unet_params"], groups(r)[key]) for r in runs if key in groups(r)]
        if pts:
            x = [p for p, _ in pts]
            axes[0].plot(x, [v[0] for _, v in pts], "o-", label=key)
            axes[1].plot(x, [v[1] for _, v in pts], "o-", label=key)
    for ax, what in zip(axes, ("wall time (s)", "peak resident memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("UNet parameters")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("trt-dm engine per stage vs UNet size (same small calibration set; this machine)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write the table into docs/performance.md and the plot")
    args = p.parse_args()
    runs = load()
    text = table(runs)
    print(text)
    if args.write:
        doc = DOC.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{DOC}: no {BEGIN} ... {END} markers")
        a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])
        plot(runs, PLOT)
        print(f"-> {DOC}, {PLOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
