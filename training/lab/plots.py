"""Figures for the lab (matplotlib, Agg backend; the GIF through matplotlib's Pillow writer).

Every function takes plain tensors and a path and writes one file; none of them trains or samples.
A trajectory is a tensor [S + 1, N, 2]: the states of N particles at S + 1 times, from noise (t = 1) to data.
Rotations (the SO(3) lab) are tensors [N, 3, 3].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

LIMIT = 3.5  # the data sets live in [-3, 3]^2; noise reaches a little further


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _square(ax: Any, title: str) -> None:
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _colours(noise: torch.Tensor) -> torch.Tensor:
    """One colour value per particle: the angle of its starting noise, so one can follow it along the flow."""
    return torch.atan2(noise[:, 1], noise[:, 0])


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def particles(traj: torch.Tensor, times: torch.Tensor, path: Path, *, title: str, panels: int = 6) -> Path:
    """Snapshots of the particles at ``panels`` evenly spaced steps of a trajectory [S + 1, N, 2]."""
    plt = _pyplot()
    picks = torch.linspace(0, traj.shape[0] - 1, panels).round().long()
    fig, axes = plt.subplots(1, panels, figsize=(2.3 * panels, 2.6))
    colour = _colours(traj[0])
    for ax, i in zip(axes, picks.tolist(), strict=True):
        ax.scatter(traj[i, :, 0], traj[i, :, 1], s=1.5, c=colour, cmap="hsv", linewidths=0)
        _square(ax, f"t = {float(times[i]):.2f}")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@torch.no_grad()
def velocity_field(
    velocity_fn: Any,
    data: torch.Tensor,
    path: Path,
    *,
    title: str,
    times: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.05),
) -> Path:
    """Arrows of v(x, t) on a 21 x 21 grid at several t, over a faint scatter of the data."""
    plt = _pyplot()
    axis = torch.linspace(-3, 3, 21)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # [21, 21] x 2 -> [441, 2]
    fig, axes = plt.subplots(1, len(times), figsize=(2.6 * len(times), 2.8))
    for ax, t in zip(axes, times, strict=True):
        v = velocity_fn(grid, torch.full((grid.shape[0],), t))
        ax.scatter(data[:, 0], data[:, 1], s=1, c="tab:red", alpha=0.3, linewidths=0)
        # draw -v: the direction particles move as t decreases from noise to data
        ax.quiver(
            grid[:, 0],
            grid[:, 1],
            -v[:, 0],
            -v[:, 1],
            v.norm(dim=1),
            cmap="viridis",
            angles="xy",
            width=0.004,
        )
        _square(ax, f"-v(x, t = {t:.2f})")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def paths(trajs: dict[str, torch.Tensor], path: Path, *, title: str, count: int = 200) -> Path:
    """Side-by-side particle paths (one panel per label): straight lines mean one step suffices."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(trajs), figsize=(3.4 * len(trajs), 3.6), squeeze=False)
    for ax, (label, traj) in zip(axes[0], trajs.items(), strict=True):
        sub = traj[:, :count]
        ax.plot(sub[:, :, 0], sub[:, :, 1], color="tab:blue", alpha=0.25, linewidth=0.6)
        ax.scatter(sub[0, :, 0], sub[0, :, 1], s=3, c="0.5", linewidths=0, label="noise")
        ax.scatter(sub[-1, :, 0], sub[-1, :, 1], s=3, c="tab:red", linewidths=0, label="sample")
        _square(ax, label)
    axes[0, 0].legend(loc="lower left", fontsize=7, markerscale=3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def quality_vs_nfe(
    rows: list[dict[str, Any]],
    floor: float,
    path: Path,
    *,
    title: str,
    models_title: str = "models (Euler, linear grid) vs diffusion",
) -> Path:
    """W2 against function evaluations (log axes): solvers on 1-RF; models with Euler vs diffusion."""
    plt = _pyplot()
    panels = {
        "solvers on 1-rectified flow": [r for r in rows if r["model"] == "1-RF"],
        models_title: [
            r for r in rows if (r["sampler"] == "euler" and r["grid"] == "linear") or r["model"] == "DDPM"
        ],
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (name, chosen) in zip(axes, panels.items(), strict=True):
        for row in chosen:
            pts = [(int(n), w) for n, w in row["w2"].items() if w is not None and math.isfinite(w)]
            style = "--" if row["model"] == "DDPM" or row["grid"] == "scheduler" else "-"
            ax.plot(
                *zip(*pts, strict=True), style, marker="o", markersize=3, label=row["label"], linewidth=1.2
            )
        ax.axhline(floor, color="k", linestyle=":", linewidth=1, label="data vs data (floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({int(n) for row in rows for n in row["w2"]})
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("function evaluations (NFE)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("W2 to held-out data")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def flow_gif(
    trajs: dict[str, torch.Tensor], times: torch.Tensor, path: Path, *, title: str, frames: int = 40
) -> Path:
    """An animated GIF of particles flowing from noise to data, one panel per label, pausing at the end."""
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    steps = next(iter(trajs.values())).shape[0]
    picks = torch.linspace(0, steps - 1, frames).round().long().tolist()
    picks += [picks[-1]] * (frames // 4)  # hold the final samples for a moment
    fig, axes = plt.subplots(1, len(trajs), figsize=(3.2 * len(trajs), 3.5), squeeze=False)
    dots = []
    for ax, (label, traj) in zip(axes[0], trajs.items(), strict=True):
        dots.append(
            ax.scatter(traj[0, :, 0], traj[0, :, 1], s=1.5, c=_colours(traj[0]), cmap="hsv", linewidths=0)
        )
        _square(ax, label)
    caption = fig.suptitle(title, fontsize=10)

    def draw(frame: int) -> list[Any]:
        i = picks[frame]
        for dot, traj in zip(dots, trajs.values(), strict=True):
            dot.set_offsets(traj[i].numpy())
        caption.set_text(f"{title}   t = {float(times[i]):.2f}")
        return dots

    fig.tight_layout()
    anim = FuncAnimation(fig, draw, frames=len(picks), blit=False)
    anim.save(path, writer=PillowWriter(fps=12), dpi=80)
    plt.close(fig)
    return path


AXIS_COLOURS = ("tab:red", "tab:green", "tab:blue")


def axes_on_sphere(rotations: dict[str, torch.Tensor], path: Path, *, title: str, columns: int = 3) -> Path:
    """Rotations [N, 3, 3] drawn as the images R e_x, R e_y, R e_z of the basis vectors (the columns of R):
    three points on the unit sphere each, in a Mollweide (equal-area) projection, one panel per label."""
    plt = _pyplot()
    rows = math.ceil(len(rotations) / columns)
    fig = plt.figure(figsize=(4.2 * columns, 2.6 * rows))
    for i, (label, r) in enumerate(rotations.items()):
        ax = fig.add_subplot(rows, columns, i + 1, projection="mollweide")
        r = r.detach().double()
        for k, colour in enumerate(AXIS_COLOURS):
            v = r[:, :, k]  # [N, 3]: the image of e_k
            lon = torch.atan2(v[:, 1], v[:, 0])
            lat = torch.asin(v[:, 2].clamp(-1, 1))
            ax.scatter(lon, lat, s=1.2, c=colour, alpha=0.5, linewidths=0)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.grid(True, alpha=0.3)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def angle_histograms(
    panels: list[tuple[str, dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]],
    path: Path,
    *,
    title: str,
    bins: int = 60,
) -> Path:
    """Density histograms of angles in [0, pi] (one step line per label) against analytic curves (w, pdf);
    one panel per (panel title, {label: angles [N]}, {label: (w [M], density [M])})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (name, samples, curves) in zip(axes[0], panels, strict=True):
        for label, angles in samples.items():
            ax.hist(angles.detach().double().numpy(), bins=bins, range=(0, math.pi), density=True,
                    histtype="step", linewidth=1.1, label=label)  # fmt: skip
        for label, (w, pdf) in curves.items():
            ax.plot(w.numpy(), pdf.numpy(), "k--", linewidth=1.2, label=label)
        ax.set_xlim(0, math.pi)
        ax.set_xlabel("angle w (rad)")
        ax.set_ylabel("density")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
