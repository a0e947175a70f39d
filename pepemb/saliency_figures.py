"""Saliency figures: attribution bars along the sequence, the masked-target x residue matrix,
student against teacher, the randomisation cascade of the sanity check and the deletion curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from pepemb.figures import plt, save, tick_indices
from pepemb.saliency import Saliency, describe_steps


def residue_axis(ax, sequence: str, max_labels: int = 60) -> None:
    ticks = tick_indices(len(sequence), max_labels)
    ax.set_xticks(ticks, [f"{sequence[i]}{i + 1}" for i in ticks], rotation=90, fontsize=7, family="monospace")
    ax.set_xlim(-0.5, len(sequence) - 0.5)
    ax.set_xlabel("residue")


def draw_saliency_bars(ax, saliency: Saliency, sequence: str) -> None:
    scores = saliency.scores
    x = np.arange(len(sequence))
    if len(saliency.targets) == 1:
        target = saliency.targets[0] - 1
        ax.bar(x, scores, color=np.where(scores >= 0, "tab:red", "tab:blue"), width=0.85)
        ax.axvspan(
            target - 0.5, target + 0.5, color="gold", alpha=0.5, label=f"masked target {sequence[target]}{target + 1}"
        )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel("attribution to log p(true residue)")
    else:
        ax.bar(x, scores, color="tab:purple", width=0.85)
        ax.set_ylabel(f"mean |attribution| over\n{len(saliency.targets)} masked targets")
    residue_axis(ax, sequence)


def bar_width(sequence: str) -> float:
    return min(max(len(sequence) * 0.16, 8.0), 24.0)


def plot_saliency(saliency: Saliency, sequence: str, title: str, path: Path, written: list[Path]) -> None:
    fig, ax = plt.subplots(figsize=(bar_width(sequence), 3.6), layout="constrained")
    draw_saliency_bars(ax, saliency, sequence)
    ax.set_title(title, fontsize=10)
    save(fig, path, written)


def plot_saliency_matrix(saliency: Saliency, sequence: str, title: str, path: Path, written: list[Path]) -> None:
    """Rows: masked target positions; columns: residues; colour: signed attribution."""
    matrix = saliency.attributions
    rows = len(saliency.targets)
    width = bar_width(sequence) + 1.5
    height = min(max(rows * width / max(len(sequence), 1), 3.5), 20.0) + 1.2
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    limit = float(np.abs(matrix).max()) or 1.0
    image = ax.imshow(
        matrix, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto", interpolation="nearest"
    )
    residue_axis(ax, sequence)
    ticks = tick_indices(rows, 40)
    ax.set_yticks(
        ticks,
        [f"{sequence[saliency.targets[i] - 1]}{saliency.targets[i]}" for i in ticks],
        fontsize=7,
        family="monospace",
    )
    ax.set_ylabel("masked target position")
    ax.plot(np.array(saliency.targets) - 1, np.arange(rows), "x", color="black", markersize=4)
    ax.set_xlabel("attributed-to residue (x: the masked target itself, attribution 0)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="attribution to log p(true residue)", shrink=0.9)
    save(fig, path, written)


def plot_saliency_comparison(
    student: Saliency,
    teacher: Saliency,
    sequence: str,
    names: list[str],
    rho: float | None,
    path: Path,
    written: list[Path],
) -> None:
    fig, axes = plt.subplots(2, 1, figsize=(bar_width(sequence), 6.4), sharex=True, layout="constrained")
    for ax, saliency, name in zip(axes, (student, teacher), names):
        draw_saliency_bars(ax, saliency, sequence)
        ax.set_title(name, fontsize=10)
    axes[0].set_xlabel("")
    rho_text = f"{rho:.3f}" if rho is not None else "undefined (constant saliency)"
    fig.suptitle(f"per-residue saliency, student vs teacher: Spearman rank correlation {rho_text}", fontsize=11)
    save(fig, path, written)


def plot_sanity(check: dict, title: str, path: Path, written: list[Path]) -> None:
    """Spearman of the trained and randomised saliency as layers are re-initialised from the top."""
    labels = ["+ " + c["down_to"] if i else c["down_to"] for i, c in enumerate(check["cascade"])]
    rhos = [np.nan if c["spearman"] is None else c["spearman"] for c in check["cascade"]]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.8 * len(labels) + 2), 3.6), layout="constrained")
    ax.plot(range(len(rhos)), rhos, "o-", color="tab:red")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(check["flag_threshold"], color="grey", ls=":", lw=1, label=f"flag at {check['flag_threshold']}")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(
        ylim=(-1.05, 1.05),
        xlabel="layers re-initialised, cumulatively from the output (last: fully random)",
        ylabel="Spearman with trained saliency",
    )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    save(fig, path, written)


def plot_faithfulness(result: dict, title: str, path: Path, written: list[Path]) -> None:
    """Deletion curves: drop in log p(true residue) as the k residues chosen by each rule are masked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    styles = {
        "saliency": ("tab:red", "o-", "top-k by saliency"),
        "nearest": ("tab:blue", "s--", "k nearest in sequence"),
        "random": ("grey", "^:", f"k random (mean of {result['random_draws']} draws)"),
    }
    for name, (color, style, label) in styles.items():
        ax.plot(
            result["sizes"],
            result["curves"][name],
            style,
            color=color,
            label=f"{label}: AOPC {result['aopc'][name]:.3f}",
        )
    ax.set(xlabel="residues masked besides the target (k)", ylabel="drop in log p(true residue), nats", xscale="log")
    ax.set_xticks(result["sizes"], [str(k) for k in result["sizes"]])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path, written)


def saliency_figures(
    saliency: Saliency, sequence: str, name: str, about: str, out_dir: Path, prefix: str, written: list[Path]
) -> None:
    """One model's saliency figures on one sequence: the bars and, for several targets, the matrix."""
    targets = saliency.targets
    what = (
        f"masked target {sequence[targets[0] - 1]}{targets[0]}"
        if len(targets) == 1
        else f"{len(targets)} masked targets"
    )
    plot_saliency(
        saliency,
        sequence,
        f"{name}: Integrated Gradients saliency, {what} ({about}, "
        f"{describe_steps(saliency)}; completeness: max |delta| {np.abs(saliency.deltas).max():.1e} "
        f"nats = {saliency.max_relative_delta:.1%} of the sum)",
        out_dir / f"{prefix}saliency.png",
        written,
    )
    if len(targets) > 1:
        plot_saliency_matrix(
            saliency,
            sequence,
            f"{name}: attribution of each residue to log p(true residue) at each masked target ({about})",
            out_dir / f"{prefix}saliency_matrix.png",
            written,
        )
