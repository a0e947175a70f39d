"""Explain a PepEmb student (and, optionally, its teacher) on one protein or a FASTA file.

    python visualization.py --model_path checkpoints/best_model/model.pt \
        --sequence "MKTVRQERLKSIVRILERSKEPVSGAQLAEELSVSRQVIVQDIAYLRSLGYNIVATPRGYVLAGG" \
        --output_dir visualizations [--teacher_model Rostlab/prot_bert] [--layer 2 --head 3]

Writes into --output_dir (teacher files carry the prefix "teacher_"):
  attention_layerNN.png       every head of layer NN (cls/eos tokens included, labelled)
  attention_layer_means.png   the head-averaged map of every layer
  attention_head_stats.png    per head: entropy and mean attention distance (local vs global)
  attention_layerNN_headMM.png one full-size map (--layer/--head)
  saliency.png                Integrated Gradients attribution each residue receives
  saliency_matrix.png         masked target position x attributed-to residue (several targets)
  saliency_comparison.png     student vs teacher saliency, with their Spearman rank correlation
  important_residues.csv      the --top_k residues by attribution score
  summary.json                every file written and the numbers behind the figures

Saliency: for each target position the residue is replaced by the mask token and Captum's
LayerIntegratedGradients attributes the log-probability of the true residue there to the token
embeddings, from a baseline where every residue is the mask token (cls/eos keep theirs, so they
get exactly zero attribution). Attribution per token is the sum over the embedding dimension.
Layers, heads and residue positions are numbered from 1 everywhere (flags, figures, files).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import PowerNorm, TwoSlopeNorm  # noqa: E402
from torch import nn  # noqa: E402

from architecture import ResidueTokenizer, load_student  # noqa: E402
from pepemb import (
    cli,  # noqa: E402
    data,  # noqa: E402
)
from pepemb.cli import UserError
from pepemb.devices import resolve_device  # noqa: E402
from pepemb.fidelity import spearman  # noqa: E402
from pepemb.files import atomic_open  # noqa: E402
from pepemb.options import add_device_arguments  # noqa: E402
from pepemb.saliency import (  # noqa: E402
    Saliency,
    describe_steps,
    faithfulness,
    integrated_gradients,
    sanity_check,
    unconverged_targets,
)
from pepemb.variant_scores import parse_positions  # noqa: E402

DPI = 130
MAX_GRID_WIDTH = 24.0  # inches: a grid of attention maps (ProtBert: 30 layers, 16 heads) stays printable
# Attention is mostly small weights with a few large ones: a square-root colour scale shows both.
ATTENTION_GAMMA = 0.5
ATTENTION_BAR_LABEL = "attention weight (square-root colour scale)"
# Residues explained by default (ESM's 1,022): attention maps and saliency grow with the square of
# the length, so a 100,000-residue protein would need hundreds of GB; --max_length raises it.
DEFAULT_MAX_LENGTH = 1022


# --------------------------------------------------------------------------------------------
# Models behind one interface
# --------------------------------------------------------------------------------------------


@dataclass
class Explainer:
    """A masked LM seen the same way whatever its origin: ids in, logits and attentions out."""

    name: str
    prefix: str  # of every file written for this model: "" (student) or "teacher_"
    model: nn.Module
    tokenizer: ResidueTokenizer
    embeddings: nn.Module  # the token-embedding layer that Integrated Gradients attributes to
    num_layers: int
    num_heads: int
    width: int  # hidden size
    max_tokens: int  # longest input the model takes, cls/eos included

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def attentions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[layers, heads, L, L] softmax weights for one unpadded sequence [L]."""
        with torch.inference_mode():
            out = self.model(input_ids=input_ids[None].to(self.device), output_attentions=True)
        attentions = out["attentions"]
        if not attentions or attentions[0] is None:
            raise UserError(f"{self.name} returned no attention weights; it cannot be visualised")
        return torch.stack([a[0].float() for a in attentions]).cpu()

    def true_residue_log_probs(self, input_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
        """[B, L]: log p(true token) at every position (Captum's forward function)."""
        logits = self.model(input_ids=input_ids)["logits"].float()
        return logits.log_softmax(-1).gather(-1, true_ids[..., None]).squeeze(-1)


def load_student_explainer(model_path: str, device: torch.device) -> Explainer:
    model, tokenizer, _ = load_student(model_path, map_location=device)
    model.requires_grad_(False)  # Integrated Gradients needs gradients of the embeddings only
    path = Path(model_path)
    folder = path.parent if path.name == "model.pt" else path
    c = model.config
    name = f"student {folder.name} ({c.num_layers} layers x {c.num_heads} heads, d {c.d_model})"
    return Explainer(
        name, "", model, tokenizer, model.embed_tokens, c.num_layers, c.num_heads, c.d_model, max_tokens=sys.maxsize
    )  # rotary positions: no length limit


def load_teacher_explainer(name_or_path: str, device: torch.device) -> Explainer:
    from pepemb.teacher import load_teacher  # transformers is heavy: import it only when asked for

    teacher = load_teacher(name_or_path, device=device)
    try:
        # The fused kernels (sdpa, flash) compute attention without materialising its weights.
        teacher.model.set_attn_implementation("eager")
    except (ValueError, AttributeError) as err:
        raise UserError(
            f"teacher {name_or_path}: cannot switch to eager attention, so its "
            f"attention weights are not available ({err})"
        ) from err
    c = teacher.model.config
    return Explainer(
        f"teacher {teacher.name}",
        "teacher_",
        teacher.model,
        teacher.tokenizer,
        teacher.model.get_input_embeddings(),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.hidden_size,
        teacher.max_positions,
    )


# --------------------------------------------------------------------------------------------
# Input checks (all before anything is written)
# --------------------------------------------------------------------------------------------


def check_sequence(sequence: str, tokenizer: ResidueTokenizer, where: str) -> str:
    """The sequence upper-cased, or UserError naming the first letter the vocabulary lacks."""
    sequence = sequence.strip().upper()
    if not sequence:
        raise UserError(f"{where}: the sequence is empty")
    letters = {t for t in tokenizer.vocab if len(t) == 1 and t.isalpha()}
    for position, letter in enumerate(sequence, 1):
        if letter not in letters:
            raise UserError(
                f"{where}: {letter!r} at position {position} is not an amino-acid "
                f"letter of the model's vocabulary ({''.join(sorted(letters))})"
            )
    return sequence


def choose_targets(
    length: int, target_position: int | None, positions: str | None, max_positions: int, protein_id: str | None = None
) -> tuple[list[int], str | None]:
    """(1-based target positions, a note when they were subsampled to max_positions). The
    subsample keeps the first and the last position (so not data.evenly_spaced, which ends short
    of the last); protein_id names the protein in a --positions error."""
    if target_position is not None:
        if not 1 <= target_position <= length:
            raise UserError(f"--target_position {target_position} is outside the sequence (positions 1..{length})")
        return [target_position], None
    targets = parse_positions(positions or None, length, protein_id)
    if len(targets) <= max_positions:
        return targets, None
    keep = np.unique(np.linspace(0, len(targets) - 1, max_positions).round().astype(int))
    note = (
        f"saliency for {len(keep)} of {len(targets)} target positions, evenly spaced (raise --max_positions to use all)"
    )
    return [targets[i] for i in keep], note


def safe_folder_name(identifier: str, taken: set[str]) -> str:
    """A file-system-safe, unique folder name from a FASTA id (sp|P69905|HBA_HUMAN -> sp_P69905_HBA_HUMAN)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", identifier).strip("._") or "sequence"
    candidate, n = name[:100], 1
    while candidate in taken:
        n += 1
        candidate = f"{name[:100]}_{n}"
    taken.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def head_statistics(attentions: torch.Tensor, query_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head, averaged over the query rows selected by the bool mask query_rows [L]:
    entropy -sum_j a_ij ln a_ij (nats) and mean attention distance sum_j a_ij |i - j| (tokens).

    attentions: [..., L, L] with rows summing to 1. Returns {"entropy", "distance"}, each [...].
    """
    length = attentions.shape[-1]
    index = torch.arange(length, dtype=attentions.dtype)
    distance = (index[:, None] - index[None, :]).abs()
    rows = attentions[..., query_rows, :]
    entropy = -torch.special.xlogy(rows, rows).sum(-1)
    mean_distance = (rows * distance[query_rows]).sum(-1)
    return {"entropy": entropy.mean(-1), "distance": mean_distance.mean(-1)}


def top_residues(saliency: Saliency, sequence: str, k: int) -> list[dict]:
    scores = saliency.scores
    return [
        {"position": int(i) + 1, "residue": sequence[i], "score": float(scores[i])}
        for i in saliency.ranked_positions[:k]
    ]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def token_labels(tokenizer: ResidueTokenizer, input_ids: torch.Tensor) -> list[str]:
    """Residue letters, with one spelling of the special tokens whatever the vocabulary's."""
    specials = {tokenizer.cls_id: "<cls>", tokenizer.eos_id: "<eos>"}
    return [specials.get(i, tokenizer.vocab[i]) for i in input_ids.tolist()]


def tick_indices(count: int, max_labels: int) -> list[int]:
    """Every index when count <= max_labels, else every k-th one; the last index always."""
    step = math.ceil(count / max_labels)
    ticks = list(range(0, count, step))
    last = count - 1
    if ticks[-1] != last:
        ticks[-1:] = [last] if last - ticks[-1] < step / 2 else [ticks[-1], last]
    return ticks


def label_tokens(ax, labels: list[str], max_labels: int, fontsize: float = 7) -> None:
    """Token labels (residue letter and position, K10) on both axes of an attention map."""
    ticks = tick_indices(len(labels), max_labels)
    # Token index i is residue position i, <cls> being token 0.
    texts = [labels[i] if labels[i].startswith("<") else f"{labels[i]}{i}" for i in ticks]
    ax.set_xticks(ticks, texts, rotation=90, fontsize=fontsize, family="monospace")
    ax.set_yticks(ticks, texts, fontsize=fontsize, family="monospace")


def save(fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


def plot_attention_grid(
    maps: torch.Tensor,
    panel_name: str,
    labels: list[str],
    title: str,
    bar_label: str,
    path: Path,
    written: list[Path],
    *,
    panel_scale: float,
    max_labels: int,
    axis_names: tuple[str, str],
) -> None:
    """Attention maps [n, L, L] as a near-square grid of heatmaps sharing one colour scale."""
    count = maps.shape[0]
    ncols = math.ceil(math.sqrt(count))
    nrows = math.ceil(count / ncols)
    panel = min(max(len(labels) / panel_scale, 3.0), 6.0, MAX_GRID_WIDTH / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel * ncols + 1.2, panel * nrows + 0.8), squeeze=False, layout="constrained"
    )
    vmax = float(maps.max())
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.set_visible(False)
            continue
        image = ax.imshow(
            maps[index], cmap="viridis", interpolation="nearest", norm=PowerNorm(ATTENTION_GAMMA, vmin=0, vmax=vmax)
        )
        ax.set_title(f"{panel_name} {index + 1}", fontsize=10)
        label_tokens(ax, labels, max_labels=max_labels, fontsize=6)
        ax.set_xlabel(axis_names[0], fontsize=8)
        ax.set_ylabel(axis_names[1], fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label=bar_label)
    fig.suptitle(title, fontsize=12)
    save(fig, path, written)


def plot_layer_heads(
    layer_attention: torch.Tensor, labels: list[str], title: str, path: Path, written: list[Path]
) -> None:
    """Every head of one layer."""
    plot_attention_grid(
        layer_attention,
        "head",
        labels,
        title,
        ATTENTION_BAR_LABEL,
        path,
        written,
        panel_scale=12,
        max_labels=24,
        axis_names=("key (attended-to token)", "query token"),
    )


def plot_layer_means(attentions: torch.Tensor, labels: list[str], title: str, path: Path, written: list[Path]) -> None:
    """The head-averaged attention map of every layer, one panel per layer."""
    plot_attention_grid(
        attentions.mean(1),
        "layer",
        labels,
        title,
        "attention weight, mean over heads (square-root colour scale)",
        path,
        written,
        panel_scale=14,
        max_labels=20,
        axis_names=("key", "query"),
    )


def plot_single_head(attention: torch.Tensor, labels: list[str], title: str, path: Path, written: list[Path]) -> None:
    side = min(max(len(labels) / 7, 6.0), 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), layout="constrained")
    image = ax.imshow(
        attention,
        cmap="viridis",
        interpolation="nearest",
        norm=PowerNorm(ATTENTION_GAMMA, vmin=0, vmax=float(attention.max())),
    )
    label_tokens(ax, labels, max_labels=40, fontsize=7 if len(labels) <= 40 else 6)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query token")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label=ATTENTION_BAR_LABEL)
    save(fig, path, written)


def plot_head_statistics(
    stats: dict[str, torch.Tensor], uniform: dict[str, float], length: int, title: str, path: Path, written: list[Path]
) -> None:
    """Entropy and mean attention distance as two annotated layer x head heatmaps.

    Colours run from 0 to at least the value of uniform attention (dashed on the colour bar), so
    a head's shade says how focused or local it is in absolute terms, comparable across models.
    """
    layers, heads = stats["entropy"].shape
    cell_w, cell_h = max(0.45, 3.0 / heads), max(0.35, 2.0 / layers)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (heads * cell_w + 2.2), layers * cell_h + 1.6), layout="constrained")
    panels = [
        ("entropy", "viridis", "entropy (nats)", "attention entropy"),
        ("distance", "magma", "mean |query - key| (tokens)", "mean attention distance"),
    ]
    fontsize = 8 if heads <= 8 else 6
    for ax, (key, cmap, bar_label, panel_title) in zip(axes, panels):
        values = stats[key].numpy()
        image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=0, vmax=max(float(values.max()), uniform[key]))
        for (row, col), value in np.ndenumerate(values):
            ax.text(
                col,
                row,
                f"{value:.2f}" if value < 10 else f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="black" if image.norm(value) > 0.6 else "white",
            )
        ax.set_xticks(range(heads), [str(h + 1) for h in range(heads)], fontsize=8)
        ax.set_yticks(range(layers), [str(layer + 1) for layer in range(layers)], fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(panel_title, fontsize=10)
        bar = fig.colorbar(image, ax=ax, label=bar_label, shrink=0.9)
        bar.ax.axhline(uniform[key], color="black", linestyle="--", linewidth=2)
    fig.suptitle(
        f"{title}\nmeans over residue query rows; uniform attention over {length} tokens "
        f"(dashed): entropy ln {length} = {uniform['entropy']:.2f}, distance "
        f"{uniform['distance']:.1f}\nlow entropy = focused head, small distance = local head",
        fontsize=10,
    )
    save(fig, path, written)


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


# --------------------------------------------------------------------------------------------
# One sequence, every model
# --------------------------------------------------------------------------------------------


def write_top_residues(path: Path, rows: list[dict], written: list[Path]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["position", "residue", "score"])
        writer.writeheader()
        writer.writerows(rows)
    written.append(path)


def print_top_residues(name: str, rows: list[dict], saliency: Saliency) -> None:
    what = (
        "attribution to the masked target"
        if len(saliency.targets) == 1
        else f"mean |attribution| over {len(saliency.targets)} masked targets"
    )
    print(f"top {len(rows)} residues, {name} ({what}):")
    print(f"  {'rank':>4}  {'position':>8}  residue  {'score':>11}")
    for rank, row in enumerate(rows, 1):
        print(f"  {rank:>4}  {row['position']:>8}  {row['residue']:^7}  {row['score']:>11.4g}")


def explain_model(
    explainer: Explainer, protein: data.Protein, targets: list[int], out_dir: Path, args, written: list[Path]
) -> tuple[dict, Saliency]:
    """Every figure and number for one model on one sequence."""
    sequence, p, name = protein.sequence, explainer.prefix, explainer.name
    input_ids = explainer.tokenizer.encode(sequence)
    labels = token_labels(explainer.tokenizer, input_ids)
    attentions = explainer.attentions(input_ids)
    about = f"{protein.id}, {len(sequence)} aa"
    specials = f"{about}; <cls>/<eos> tokens shown"
    for layer in range(explainer.num_layers):
        plot_layer_heads(
            attentions[layer],
            labels,
            f"{name}: layer {layer + 1}, every head ({specials})",
            out_dir / f"{p}attention_layer{layer + 1:02d}.png",
            written,
        )
    plot_layer_means(
        attentions,
        labels,
        f"{name}: attention averaged over heads ({specials})",
        out_dir / f"{p}attention_layer_means.png",
        written,
    )
    if args.layer is not None:
        plot_single_head(
            attentions[args.layer - 1, args.head - 1],
            labels,
            f"{name}: layer {args.layer}, head {args.head} ({specials})",
            out_dir / f"{p}attention_layer{args.layer:02d}_head{args.head:02d}.png",
            written,
        )
    residue_rows = torch.zeros(len(input_ids), dtype=torch.bool)
    residue_rows[1:-1] = True
    stats = head_statistics(attentions, residue_rows)
    uniform_map = torch.full((len(input_ids), len(input_ids)), 1 / len(input_ids))
    uniform = {k: float(v) for k, v in head_statistics(uniform_map, residue_rows).items()}
    plot_head_statistics(
        stats,
        uniform,
        len(input_ids),
        f"{name}: attention per head ({about})",
        out_dir / f"{p}attention_head_stats.png",
        written,
    )

    saliency = integrated_gradients(explainer, sequence, targets, args.n_steps, args.internal_batch_size)
    report_convergence(name, saliency)
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
        out_dir / f"{p}saliency.png",
        written,
    )
    if len(targets) > 1:
        plot_saliency_matrix(
            saliency,
            sequence,
            f"{name}: attribution of each residue to log p(true residue) at each masked target ({about})",
            out_dir / f"{p}saliency_matrix.png",
            written,
        )
    top = top_residues(saliency, sequence, args.top_k)
    print_top_residues(name, top, saliency)
    write_top_residues(out_dir / f"{p}important_residues.csv", top, written)
    summary = {
        "name": name,
        "head_stats": {
            "entropy_nats": stats["entropy"].tolist(),
            "mean_distance_tokens": stats["distance"].tolist(),
            "uniform_attention": {"entropy_nats": uniform["entropy"], "mean_distance_tokens": uniform["distance"]},
        },
        "integrated_gradients": {"targets": targets, **saliency.summary()},
        "saliency_scores": saliency.scores.tolist(),
        "top_residues": top,
    }
    if args.sanity_check:
        checked = data.evenly_spaced(list(range(len(targets))), args.sanity_targets)  # IG again per randomised model
        subset = Saliency(
            [targets[i] for i in checked],
            saliency.attributions[checked],
            saliency.deltas[checked],
            saliency.totals[checked],
            saliency.n_steps[checked],
        )
        summary["sanity_check"] = {
            "targets": subset.targets,
            **sanity_check(
                explainer,
                sequence,
                subset.targets,
                subset,
                seed=args.seed,
                internal_batch_size=args.internal_batch_size,
            ),
        }
        report_sanity(name, summary["sanity_check"])
        plot_sanity(
            summary["sanity_check"],
            f"{name}: saliency after randomising the weights ({about})",
            out_dir / f"{p}saliency_sanity.png",
            written,
        )
    if args.faithfulness:
        summary["faithfulness"] = faithfulness(explainer, sequence, saliency, seed=args.seed)
        report_faithfulness(name, summary["faithfulness"])
        plot_faithfulness(
            summary["faithfulness"],
            f"{name}: deletion test over {len(targets)} target(s) ({about})",
            out_dir / f"{p}saliency_faithfulness.png",
            written,
        )
    return summary, saliency


def report_convergence(name: str, saliency: Saliency) -> None:
    print(
        f"{name}: Integrated Gradients over {len(saliency.targets)} target(s), {describe_steps(saliency)}: "
        f"max |convergence delta| {np.abs(saliency.deltas).max():.2e} nats = {saliency.max_relative_delta:.2%} "
        f"of |attribution sum|"
    )
    missed = unconverged_targets(saliency)
    if missed:
        print(
            f"warning: {name}: completeness is off by more than 5% (and 1e-3 nats) at {len(missed)} target(s) "
            f"after {int(saliency.n_steps.max())} steps: positions {', '.join(map(str, missed))}; their "
            "attributions are approximate (raise --n_steps)"
        )


def report_sanity(name: str, check: dict) -> None:
    rho = check["fully_random_spearman"]
    steps = ", ".join(
        f"{c['down_to']} {'—' if c['spearman'] is None else format(c['spearman'], '.2f')}" for c in check["cascade"]
    )
    print(f"{name}: sanity check, Spearman of trained vs randomised saliency (cascading from the top): {steps}")
    if check["flagged"]:
        print(
            f"warning: {name}: the saliency of a fully randomised model still ranks residues like the trained "
            f"one (Spearman {rho:.2f} >= {check['flag_threshold']}): it reflects the input more than what "
            "the model learned"
        )


def report_faithfulness(name: str, result: dict) -> None:
    aopc = result["aopc"]
    print(
        f"{name}: deletion test, AOPC (mean drop in log p(true residue), nats): saliency {aopc['saliency']:.3f}, "
        f"random {aopc['random']:.3f}, nearest in sequence {aopc['nearest']:.3f}"
    )


def explain_sequence(
    explainers: list[Explainer], protein: data.Protein, targets: list[int], note: str | None, out_dir: Path, args
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {protein.id} ({len(protein.sequence)} residues) -> {out_dir}")
    if note:
        print(f"note: {note}")
    written: list[Path] = []
    results = [explain_model(e, protein, targets, out_dir, args, written) for e in explainers]
    summary = {
        "id": protein.id,
        "length": len(protein.sequence),
        "sequence": protein.sequence,
        "output_dir": str(out_dir),
        "targets": targets,
        "targets_note": note,
        "models": {("teacher" if e.prefix else "student"): r[0] for e, r in zip(explainers, results)},
    }
    if len(results) == 2:
        (_, student), (_, teacher) = results
        positions = student.ranked_positions  # the same for both: same sequence and targets
        rho = spearman(student.scores[positions], teacher.scores[positions])
        plot_saliency_comparison(
            student,
            teacher,
            protein.sequence,
            [e.name for e in explainers],
            rho,
            out_dir / "saliency_comparison.png",
            written,
        )
        print(
            f"Spearman rank correlation of student and teacher saliency: {'undefined' if rho is None else f'{rho:.3f}'}"
        )
        summary["saliency_spearman"] = rho
    summary["files"] = [str(path) for path in written]
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, help="student checkpoint folder or its model.pt")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sequence", help="one protein sequence (amino-acid letters)")
    source.add_argument("--fasta", help="FASTA file: one output subfolder per sequence")
    p.add_argument(
        "--output_dir",
        default="visualizations",
        help="created if missing; files in it are overwritten (default: visualizations)",
    )
    p.add_argument(
        "--teacher_model",
        default=None,
        help="also explain this HF masked LM (Hub id, local folder or 'antiberty'), "
        "and compare its saliency with the student's",
    )
    p.add_argument("--layer", type=int, help="with --head: one full-size attention map (1-based)")
    p.add_argument("--head", type=int, help="with --layer: one full-size attention map (1-based)")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument(
        "--target_position", type=int, help="1-based residue position to mask and explain (default: every position)"
    )
    targets.add_argument("--positions", help="subset of target positions, e.g. 5,10,20-30")
    p.add_argument(
        "--max_positions",
        type=int,
        default=100,
        help="at most this many targets per sequence, evenly spaced (default: 100)",
    )
    p.add_argument(
        "--n_steps",
        type=int,
        default=None,
        help="Integrated Gradients steps for every target (default: per target, 16 doubled until "
        "the attributions add up to the output's change within 5%% or 1e-3 nats, at most 512)",
    )
    p.add_argument(
        "--sanity_check",
        action="store_true",
        help="also recompute the saliency with the weights re-initialised from the top layer down "
        "(Adebayo et al. 2018) and report its Spearman with the trained model's",
    )
    p.add_argument(
        "--faithfulness",
        action="store_true",
        help="also mask the top-k salient residues (k = 1, 2, 5, 10, 20%% of the sequence) and "
        "measure the drop in log p(true residue), against random and nearest residues (AOPC)",
    )
    p.add_argument(
        "--sanity_targets",
        type=int,
        default=20,
        help="targets (evenly spaced among those explained) that --sanity_check recomputes for each "
        "randomised model; 0: all",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the randomised weights and random deletions")
    p.add_argument(
        "--internal_batch_size",
        type=int,
        default=None,
        help="Integrated Gradients samples (targets x steps) per forward pass "
        "(default: about 1 GB of activations' worth)",
    )
    p.add_argument("--top_k", type=int, default=10, help="residues in important_residues.csv (default: 10)")
    p.add_argument(
        "--max_length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"refuse longer sequences: memory grows with the square of the length (default: {DEFAULT_MAX_LENGTH})",
    )
    add_device_arguments(p, training=False, precision=False)
    return p


def validate_args(args) -> None:
    if (args.layer is None) != (args.head is None):
        raise UserError("--layer and --head go together: pass both (1-based), or neither")
    for flag in ("max_positions", "n_steps", "top_k", "internal_batch_size", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.sanity_targets < 0:
        raise UserError(f"--sanity_targets must not be negative, got {args.sanity_targets}")


def check_layer_head(args, explainers: list[Explainer]) -> None:
    if args.layer is None:
        return
    for e in explainers:
        if not 1 <= args.layer <= e.num_layers:
            raise UserError(f"--layer {args.layer} is out of range: {e.name} has layers 1..{e.num_layers}")
        if not 1 <= args.head <= e.num_heads:
            raise UserError(f"--head {args.head} is out of range: {e.name} has heads 1..{e.num_heads}")


def read_proteins(args, tokenizer: ResidueTokenizer) -> list[data.Protein]:
    if args.sequence is not None:
        records = [(data.Protein("query", "", args.sequence), "--sequence")]
    else:
        records = [(p, f"{args.fasta}, {p.id}") for p in data.read_fasta(args.fasta)]
    proteins = []
    for protein, where in records:
        sequence = check_sequence(protein.sequence, tokenizer, where)
        if len(sequence) > args.max_length:
            raise UserError(
                f"{where}: {len(sequence):,} residues, more than --max_length "
                f"{args.max_length} (attention maps and saliency grow with the square of "
                f"the length); pass a window of it with --sequence, or raise --max_length"
            )
        proteins.append(data.Protein(protein.id, protein.description, sequence))
    return proteins


def main(argv=None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    output_dir = cli.writable_folder(args.output_dir, "--output_dir")
    device = resolve_device(args.device)
    explainers = [load_student_explainer(args.model_path, device)]
    proteins = read_proteins(args, explainers[0].tokenizer)
    if args.teacher_model:
        teacher = load_teacher_explainer(args.teacher_model, device)
        if teacher.tokenizer.vocab_hash != explainers[0].tokenizer.vocab_hash:
            raise UserError(
                f"{teacher.name} and the student do not share a vocabulary (hash "
                f"{teacher.tokenizer.vocab_hash} vs {explainers[0].tokenizer.vocab_hash}); "
                f"compare a student with the teacher it was distilled from"
            )
        too_long = [p for p in proteins if len(p.sequence) + 2 > teacher.max_tokens]
        if too_long:
            raise UserError(
                f"{too_long[0].id} has {len(too_long[0].sequence)} residues; "
                f"{teacher.name} takes at most {teacher.max_tokens - 2}"
            )
        explainers.append(teacher)
    check_layer_head(args, explainers)
    plans = [
        (
            p,
            *choose_targets(
                len(p.sequence), args.target_position, args.positions, args.max_positions, p.id if args.fasta else None
            ),
        )
        for p in proteins
    ]

    taken: set[str] = set()
    summaries = [
        explain_sequence(
            explainers,
            protein,
            targets,
            note,
            output_dir / safe_folder_name(protein.id, taken) if args.fasta else output_dir,
            args,
        )
        for protein, targets, note in plans
    ]
    files = [f for s in summaries for f in s["files"]]
    summary = {
        "student": {"name": explainers[0].name, "path": args.model_path},
        "teacher": {"name": explainers[1].name} if len(explainers) > 1 else None,
        "device": str(device),
        "n_steps": args.n_steps,
        "top_k": args.top_k,
        "numbering": "layers, heads and residue positions are 1-based; head_stats rows are layers, columns heads",
        "sequences": summaries,
        "files": files + [str(output_dir / "summary.json")],
    }
    with atomic_open(output_dir / "summary.json", "w") as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {len(files)} figures and tables to {output_dir}/ (listed in {output_dir / 'summary.json'})")


if __name__ == "__main__":
    cli.run(main)
