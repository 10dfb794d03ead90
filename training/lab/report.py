"""The lab's tables: ``results.json`` (everything, machine-readable) and ``results.md`` (for people).

Cells are W2 to held-out data (lower is better). A cell written ``0.123 (7)`` used 7 function evaluations
under a budget of 8 (Heun's last step is an Euler step); a missing cell means the solver cannot run within
that budget (midpoint needs 2 evaluations, rk4 4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _finite(value: Any) -> Any:
    """JSON has no inf / nan: store them as null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def few_and_top(nfes: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """The budgets the targets and the summary compare: "few" (8, or the largest under 8) and the top."""
    return (8 if 8 in nfes else max(n for n in nfes if n <= 8)), max(nfes)


def _cell(row: dict[str, Any], budget: int) -> str:
    key = str(budget)
    if key not in row["w2"]:
        return ""
    value = row["w2"][key]
    text = "diverged" if value is None or not math.isfinite(value) else f"{value:.3f}"
    used = row["nfe_used"][key]
    return text if used == budget else f"{text} ({used})"


def dataset_markdown(name: str, result: dict[str, Any], nfes: list[int]) -> list[str]:
    """The section of one data set: W2 vs NFE for every (model, sampler, grid), straightness, targets."""
    sec = result["seconds"]
    lines = [
        f"### {name}",
        "",
        f"W2 floor (two independent data samples of the same size): {result['floor_w2']:.3f}. "
        f"Wall time {sec['total']:.0f} s (training: "
        + ", ".join(
            f"{k} {sec[k]:.0f} s" for k in ("1-RF", "couplings", "2-RF", "OT-CFM", "DDPM", "PD") if k in sec
        )
        + ").",
        "",
        "| model | sampler | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|---|" + "---:|" * len(nfes),
    ]
    for row in result["rows"]:
        cells = " | ".join(_cell(row, n) for n in nfes)
        lines.append(f"| {row['model']} | {row['sampler']} | {row['grid'] or 'trailing'} | {cells} |")
    straight = ", ".join(f"{m} {v:.4f}" for m, v in result["straightness"].items())
    lines += ["", f"Straightness (Liu et al. 2022; 0 = straight): {straight}.", ""]
    for check in result["targets"].values():
        mark = "met" if check["met"] else "MISSED"
        lines.append(f"- {check['rule']}: {check['value']:.3f} vs {check['threshold']:.3f}: **{mark}**")
    lines.append("")
    return lines


def summary_markdown(results: dict[str, Any]) -> list[str]:
    """One line per data set with the numbers the targets compare."""
    few, top = few_and_top(results["config"]["nfes"])
    lines = [
        f"| data set | 1-RF euler@1 | 2-RF euler@1 | OT-CFM euler@1 | 1-RF euler@{few} | 1-RF rk4@{few} "
        f"| DDIM@{few} | DDPM@{top} | 1-RF euler@{top} | straightness 1-RF / 2-RF / OT | targets met |",
        "|---|" + "---:|" * 9 + "---|",
    ]
    for name, res in results["datasets"].items():
        if res.get("kind") == "so3":  # its own section (``so3_markdown``)
            continue
        w = {(r["model"], r["sampler"], r["grid"]): r["w2"] for r in res["rows"]}

        def get(model: str, sampler: str, n: int, grid: str | None = "linear", w=w) -> str:
            value = w.get((model, sampler, grid), {}).get(str(n))
            return "" if value is None else f"{value:.3f}"

        s = res["straightness"]
        met = sum(t["met"] for t in res["targets"].values())
        lines.append(
            f"| {name} | {get('1-RF', 'euler', 1)} | {get('2-RF', 'euler', 1)} | {get('OT-CFM', 'euler', 1)} "
            f"| {get('1-RF', 'euler', few)} | {get('1-RF', 'rk4', few)} | {get('DDPM', 'ddim', few, None)} "
            f"| {get('DDPM', 'ddpm', top, None)} | {get('1-RF', 'euler', top)} "
            f"| {s['1-RF']:.3f} / {s['2-RF']:.3f} / {s['OT-CFM']:.3f} | {met}/{len(res['targets'])} |"
        )
    return lines


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out``; returns their paths."""
    from mmdit_flow.weights.io import atomic_path

    json_path, md_path = out / "results.json", out / "results.md"
    with atomic_path(json_path) as tmp:  # a Ctrl-C while writing leaves the previous tables whole
        tmp.write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    nfes = list(results["config"]["nfes"])
    lines = [
        "# 2-D lab results",
        "",
        *_status_lines(results),
        f"Command: `{results['command']}`. Seed {results['config']['seed']}, "
        f"total wall time {results['seconds']:.0f} s, torch threads {results['threads']}.",
        "",
        "Quality is the exact W2 distance (POT `ot.emd2`, squared-Euclidean cost, uniform weights) between "
        f"{results['config']['n_test']} samples and as many held-out data points; lower is better. "
        "NFE = network evaluations, counted. Flow models use the linear grid unless the grid column says "
        "`scheduler`; diffusion samplers are diffusers' DDIM (eta 0) and DDPM, trailing timestep spacing. "
        "SO(3) data sets use the geodesic distance instead (their own section says how).",
        "",
    ]
    if any(res.get("kind") != "so3" for res in results["datasets"].values()):
        lines += ["## Summary", "", *summary_markdown(results), ""]
    lines += ["## Per data set", ""]
    for name, res in results["datasets"].items():
        lines += so3_markdown(name, res) if res.get("kind") == "so3" else dataset_markdown(name, res, nfes)
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _status_lines(results: dict[str, Any]) -> list[str]:
    """Notes above the tables: a smoke run (``--quick``) and a run stopped before its last data set."""
    lines = []
    if results["config"].get("smoke"):
        lines += [
            "**Smoke run (`--quick`)**: tiny models trained for seconds. These numbers show that the lab "
            "runs, not what the methods can do; run without `--quick` for the real tables.",
            "",
        ]
    if results.get("stopped"):
        done = ", ".join(results["datasets"])
        lines += [
            f"**Stopped** after {len(results['datasets'])} data set(s) ({done}); "
            f"not run: {', '.join(results['stopped'])}.",
            "",
        ]
    return lines


def so3_markdown(name: str, result: dict[str, Any]) -> list[str]:
    """The section of an SO(3) data set: W2 on SO(3) vs NFE for 1-RF and 2-RF, straightness, targets and the
    log-likelihood of held-out rotations against the exact mixture density."""
    sec, nfes, mix = result["seconds"], result["nfes"], result["mixture"]
    comps = "; ".join(
        f"{w:g} x IGSO(3)({s:g}) around exp({tuple(m)})"
        for m, s, w in zip(mix["means"], mix["sigmas"], mix["weights"], strict=True)
    )
    lines = [
        f"### {name} (rotations, SO(3))",
        "",
        f"Target: {comps}. Noise: uniform rotations. Quality: exact W2 on SO(3) between {result['n_test']} "
        "samples and as many held-out target draws, ground cost the squared rotation angle between two "
        "rotations (`so3.distance`, radians; W2 <= pi); solvers in the Lie algebra (`so3.solve`), "
        "linear grid.",
        "",
        f"W2 floor (two independent target samples of the same size): {result['floor_w2']:.3f}. "
        f"Wall time {sec['total']:.0f} s ("
        + ", ".join(
            f"{k} {sec[k]:.0f} s" for k in ("1-RF", "couplings", "2-RF", "evaluate", "likelihood") if k in sec
        )
        + ").",
        "",
        "| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---:|" * len(nfes),
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['sampler']} | " + " | ".join(_cell(row, n) for n in nfes) + " |"
        )
    straight = ", ".join(f"{m} {v:.4f}" for m, v in result["straightness"].items())
    lines += ["", f"Straightness (Liu et al. 2022 on SO(3); 0 = geodesic paths): {straight}.", ""]
    for check in result["targets"].values():
        mark = "met" if check["met"] else "MISSED"
        lines.append(f"- {check['rule']}: {check['value']:.4g} vs {check['threshold']:.4g}: **{mark}**")
    ll = result["log_likelihood"]
    lines += [
        "",
        f"Log-likelihood of {ll['n']} held-out target rotations (nats, Riemannian volume; "
        f"`so3.log_likelihood`, rk4, exact divergence): exact mixture {ll['exact']:.3f}, "
        f"uniform {ll['uniform']:.3f}. "
        "The gap exact - flow estimates KL(target || flow), +- one standard error.",
        "",
        "| model | rk4 steps (NFE) | mean log-likelihood | gap to exact (KL) |",
        "|---|---:|---:|---:|",
    ]
    for model, by_steps in ll["models"].items():
        for steps, v in by_steps.items():
            lines.append(
                f"| {model} | {steps} ({v['nfe']}) | {v['mean']:.3f} | {v['kl']:.3f} +- {v['kl_se']:.3f} |"
            )
    lines.append("")
    return lines
