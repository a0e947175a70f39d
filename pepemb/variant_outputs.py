"""What score.py writes: scores.csv (a row per variant) and, per protein with single
substitutions, a heatmap of positions x the 20 residues on a diverging scale centred at 0."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from architecture import STANDARD_RESIDUES
from pepemb import data
from pepemb.files import atomic_open, file_names


def write_scores(path: Path, proteins, mutations, scores: np.ndarray, strategy: str, teacher_scores=None) -> None:
    """scores.csv: id, mutation, score and strategy per variant (and teacher_score with a second model)."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["id", "mutation", "score", "strategy"] + (["teacher_score"] if teacher_scores is not None else [])
        )
        for i, m in enumerate(mutations):
            extra = [f"{teacher_scores[i]:.6g}"] if teacher_scores is not None else []
            writer.writerow([proteins[m.protein].id, m.text, f"{scores[i]:.6g}", strategy, *extra])


def write_heatmaps(output_dir: Path, proteins, mutations, scores, strategy: str, model_name: str) -> list[str]:
    """A heatmap per protein with single substitutions; returns the files written."""
    singles = {}
    for m, value in zip(mutations, scores):
        if len(m.substitutions) == 1:
            _, position, mutant = m.substitutions[0]
            singles.setdefault(m.protein, []).append((position, mutant, float(value)))
    written = []
    names = file_names([p.id for p in proteins])  # distinct even where ids differ only in unsafe letters
    for i, rows in singles.items():
        protein = proteins[i]
        path = output_dir / f"heatmap_{names[i]}.png"
        plot_heatmap(
            protein,
            rows,
            f"{protein.id} ({len(protein.sequence)} aa): {strategy} scores by {Path(model_name).name}",
            path,
        )
        written.append(str(path))
    return written


def heatmap_matrix(sequence: str, singles: list[tuple[int, str, float]]) -> tuple[list[int], np.ndarray]:
    """(positions, [positions, 20] scores, NaN where not scored and 0 at the wild type)."""
    positions = sorted({p for p, _, _ in singles})
    row = {p: i for i, p in enumerate(positions)}
    matrix = np.full((len(positions), len(STANDARD_RESIDUES)), np.nan)
    for p in positions:
        wild = sequence[p - 1].upper()
        matrix[row[p], STANDARD_RESIDUES.index(wild)] = 0.0
    for p, mutant, value in singles:
        matrix[row[p], STANDARD_RESIDUES.index(mutant)] = value
    return positions, matrix


def plot_heatmap(protein: data.Protein, singles, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    positions, matrix = heatmap_matrix(protein.sequence, singles)
    bound = max(float(np.nanmax(np.abs(matrix))), 1e-6)
    width = min(max(6.0, 0.14 * len(positions) + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(width, 4.6), layout="constrained")
    image = ax.imshow(
        matrix.T, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound), interpolation="nearest"
    )
    ax.set_facecolor("0.85")  # not scored
    wild = [STANDARD_RESIDUES.index(protein.sequence[p - 1].upper()) for p in positions]
    ax.scatter(
        range(len(positions)),
        wild,
        marker="o",
        s=9,
        facecolors="none",
        edgecolors="black",
        linewidths=0.7,
        label="wild type",
    )
    step = max(1, int(np.ceil(len(positions) / 40)))
    ticks = list(range(0, len(positions), step))
    ax.set_xticks(
        ticks, [f"{protein.sequence[positions[i] - 1]}{positions[i]}" for i in ticks], rotation=90, fontsize=7
    )
    ax.set_yticks(range(len(STANDARD_RESIDUES)), list(STANDARD_RESIDUES), fontsize=7)
    ax.set(xlabel="position (wild type and 1-based number)", ylabel="mutant residue")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.colorbar(image, ax=ax, label="score: log p(mutant) - log p(wild type)", pad=0.01)
    fig.savefig(path, dpi=130)
    plt.close(fig)
