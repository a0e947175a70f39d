"""Attention weights of one sequence: a figure of every head of each layer, the head-averaged map
of every layer, one full-size head, and per head the entropy and mean attention distance
(focused or spread, local or global) against uniform attention."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import PowerNorm

from architecture import ResidueTokenizer
from pepemb.figures import plt, save, tick_indices

MAX_GRID_WIDTH = 24.0  # inches: a grid of attention maps (ProtBert: 30 layers, 16 heads) stays printable
# Attention is mostly small weights with a few large ones: a square-root colour scale shows both.
ATTENTION_GAMMA = 0.5
ATTENTION_BAR_LABEL = "attention weight (square-root colour scale)"


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


def token_labels(tokenizer: ResidueTokenizer, input_ids: torch.Tensor) -> list[str]:
    """Residue letters, with one spelling of the special tokens whatever the vocabulary's."""
    specials = {tokenizer.cls_id: "<cls>", tokenizer.eos_id: "<eos>"}
    return [specials.get(i, tokenizer.vocab[i]) for i in input_ids.tolist()]


def label_tokens(ax, labels: list[str], max_labels: int, fontsize: float = 7) -> None:
    """Token labels (residue letter and position, K10) on both axes of an attention map."""
    ticks = tick_indices(len(labels), max_labels)
    # Token index i is residue position i, <cls> being token 0.
    texts = [labels[i] if labels[i].startswith("<") else f"{labels[i]}{i}" for i in ticks]
    ax.set_xticks(ticks, texts, rotation=90, fontsize=fontsize, family="monospace")
    ax.set_yticks(ticks, texts, fontsize=fontsize, family="monospace")


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


def residue_head_statistics(attentions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """head_statistics of [layers, heads, L, L] maps over the residue query rows (cls/eos rows
    left out), and the same numbers for uniform attention over the L tokens, the reference."""
    length = attentions.shape[-1]
    residue_rows = torch.zeros(length, dtype=torch.bool)
    residue_rows[1:-1] = True
    stats = head_statistics(attentions, residue_rows)
    uniform_map = torch.full((length, length), 1 / length)
    uniform = {k: float(v) for k, v in head_statistics(uniform_map, residue_rows).items()}
    return stats, uniform


def attention_figures(
    explainer, sequence: str, about: str, out_dir: Path, written: list[Path], layer_head: tuple[int, int] | None = None
) -> dict:
    """Every attention figure of one model (a pepemb.explainer.Explainer) on one sequence, named
    with its prefix: each layer's heads, the layer means, the 1-based (layer, head) map if asked,
    and the head statistics, which it returns for summary.json."""
    p, name = explainer.prefix, explainer.name
    input_ids = explainer.tokenizer.encode(sequence)
    labels = token_labels(explainer.tokenizer, input_ids)
    attentions = explainer.attentions(input_ids)
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
    if layer_head is not None:
        layer, head = layer_head
        plot_single_head(
            attentions[layer - 1, head - 1],
            labels,
            f"{name}: layer {layer}, head {head} ({specials})",
            out_dir / f"{p}attention_layer{layer:02d}_head{head:02d}.png",
            written,
        )
    stats, uniform = residue_head_statistics(attentions)
    plot_head_statistics(
        stats,
        uniform,
        len(input_ids),
        f"{name}: attention per head ({about})",
        out_dir / f"{p}attention_head_stats.png",
        written,
    )
    return {
        "entropy_nats": stats["entropy"].tolist(),
        "mean_distance_tokens": stats["distance"].tolist(),
        "uniform_attention": {"entropy_nats": uniform["entropy"], "mean_distance_tokens": uniform["distance"]},
    }
