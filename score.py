"""Score protein variants zero-shot with a distilled student (or any masked protein LM), fast.

    python score.py checkpoints/best_model antibodies.fasta scores/ --scan --positions 20-40,95
    python score.py pepemb-hf/ proteins.fasta scores/ --mutations variants.csv --scoring masked-marginal \
        --compare_with antiberty

MODEL is a student checkpoint (folder or model.pt), its native export (embed.py --export_hf), or
any HuggingFace masked LM (Hub id, save_pretrained folder, or "antiberty"). Variants come from
--mutations FILE (a CSV with the header `id,mutation`: the FASTA id and a mutation like A23G,
1-based, or several joined by ':') or --scan (all 19 substitutions of every residue, or of
--positions). Every line is checked against the sequences before any model runs.

Scoring (ESM's examples/variant-prediction): masked-marginal (default; the site masked,
log p(mutant) - log p(wild type), as ESM-1v), wt-marginal (one unmasked pass per protein: the
fast approximation) or pll (pseudo-log-likelihood of the mutant minus the wild type's: one
forward row per residue of each variant, for multi-mutants). Under the marginal strategies a
multi-mutant's score is the sum of its sites'. Masked copies are packed under --max_tokens; a
protein longer than --max_length residues is read through a window centred on each site.

OUTPUT_DIR receives scores.csv (id, mutation, score, strategy), heatmap_<id>.png per protein with
single substitutions (positions x the 20 residues, wild type marked, diverging scale centred at 0)
and summary.json (counts, timings, model; with --compare_with the teacher's Spearman and speed).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from architecture import STANDARD_RESIDUES
from pepemb import cli, data, devices, fidelity
from pepemb.cli import UserError
from pepemb.files import atomic_open, file_names
from pepemb.inference import DEFAULT_MAX_LENGTH, load_embedder
from pepemb.options import add_device_arguments
from pepemb.variant_scores import STRATEGIES, read_mutations, scan, score


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="student checkpoint or export, or a HuggingFace masked LM ('antiberty', a Hub id)")
    p.add_argument("fasta", help="FASTA file of the wild-type proteins")
    p.add_argument("output_dir", help="folder for scores.csv, the heatmaps and summary.json")
    variants = p.add_mutually_exclusive_group(required=True)
    variants.add_argument("--mutations", metavar="FILE", help="CSV with the header id,mutation (A23G or A23G:K45R)")
    variants.add_argument("--scan", action="store_true", help="every single substitution of every residue")
    p.add_argument("--positions", help="with --scan: 1-based positions to scan, e.g. 20-40,95 (default: all)")
    p.add_argument("--scoring", choices=STRATEGIES, default="masked-marginal", help="how a variant is scored")
    p.add_argument(
        "--compare_with",
        metavar="TEACHER",
        help="also score with this model and report the Spearman between the two and the speed ratio",
    )
    p.add_argument("--max_tokens", type=int, default=8192, help="token budget per forward pass (rows x padded length)")
    p.add_argument(
        "--max_length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="residues per forward pass; longer proteins are read through a window centred on each site",
    )
    add_device_arguments(p, training=False, precision=False)
    p.add_argument("--overwrite", action="store_true", help="replace the scores in OUTPUT_DIR")
    return p


def check_inputs(args) -> tuple[list[data.Protein], list]:
    """The proteins and the variants, every flag and line checked before any model is loaded."""
    if args.positions and not args.scan:
        raise UserError("--positions goes with --scan")
    if args.max_tokens < 1 or args.max_length < 1:
        raise UserError("--max_tokens and --max_length must be positive")
    output_dir = cli.writable_folder(args.output_dir, "OUTPUT_DIR")
    if (output_dir / "scores.csv").exists() and not args.overwrite:
        raise UserError(f"{output_dir} already holds scores.csv; pass --overwrite or another OUTPUT_DIR")
    proteins = data.read_fasta(args.fasta, drop_duplicates=False)
    duplicated = sorted({p.id for p in proteins if sum(q.id == p.id for q in proteins) > 1})
    if duplicated:
        raise UserError(f"{args.fasta}: ids must be unique to name variants; {duplicated[0]} occurs more than once")
    mutations = scan(proteins, args.positions) if args.scan else read_mutations(args.mutations, proteins)
    if not mutations:
        raise UserError("nothing to score: no standard residue at the scanned positions")
    return proteins, mutations


def run_model(name: str, proteins, mutations, args, device) -> tuple[np.ndarray, dict]:
    """Scores of every variant by one model, and what it was and how long it took."""
    model = load_embedder(name, device)
    max_len = min(args.max_length + 2, model.max_positions)
    start = time.perf_counter()
    scores = score(
        model.logits,
        model.tokenizer,
        proteins,
        mutations,
        args.scoring,
        max_tokens=args.max_tokens,
        max_len=max_len,
        device=device,
    )
    seconds = time.perf_counter() - start
    about = {
        "name": model.name,
        "kind": "student" if model.is_student else "huggingface",
        "num_parameters": model.num_parameters,
        "seconds": seconds,
        "variants_per_s": len(mutations) / seconds if seconds > 0 else None,
    }
    return scores, about


def agreement(mutations, scores: np.ndarray, teacher_scores: np.ndarray) -> dict:
    """Spearman of two models' scores over all variants and, averaged, within each protein."""
    proteins = np.array([m.protein for m in mutations])
    per_protein = [fidelity.spearman(scores[proteins == p], teacher_scores[proteins == p]) for p in np.unique(proteins)]
    defined = [r for r in per_protein if r is not None]
    return {
        "spearman": fidelity.spearman(scores, teacher_scores),
        "spearman_per_protein_mean": float(np.mean(defined)) if defined else None,
    }


def write_scores(path: Path, proteins, mutations, scores: np.ndarray, strategy: str, teacher_scores=None) -> None:
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["id", "mutation", "score", "strategy"] + (["teacher_score"] if teacher_scores is not None else [])
        )
        for i, m in enumerate(mutations):
            extra = [f"{teacher_scores[i]:.6g}"] if teacher_scores is not None else []
            writer.writerow([proteins[m.protein].id, m.text, f"{scores[i]:.6g}", strategy, *extra])


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    proteins, mutations = check_inputs(args)
    output_dir = Path(args.output_dir)
    device = devices.resolve_device(args.device)
    scores, model = run_model(args.model, proteins, mutations, args, device)
    summary = {
        "model": model,
        "strategy": args.scoring,
        "fasta": str(args.fasta),
        "counts": {
            "proteins": len({m.protein for m in mutations}),
            "variants": len(mutations),
            "multi_mutants": sum(len(m.substitutions) > 1 for m in mutations),
        },
    }
    teacher_scores = None
    if args.compare_with:
        teacher_scores, teacher = run_model(args.compare_with, proteins, mutations, args, device)
        summary["compare_with"] = {
            **teacher,
            **agreement(mutations, scores, teacher_scores),
            "speedup": teacher["seconds"] / model["seconds"] if model["seconds"] > 0 else None,
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_scores(output_dir / "scores.csv", proteins, mutations, scores, args.scoring, teacher_scores)
    summary["heatmaps"] = write_heatmaps(output_dir, proteins, mutations, scores, args.scoring, model["name"])
    with atomic_open(output_dir / "summary.json", "w") as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")
    print(
        f"scored {len(mutations):,} variants of {summary['counts']['proteins']} protein(s) in {model['seconds']:.1f} s "
        f"({args.scoring}); {output_dir / 'scores.csv'}"
    )
    if args.compare_with:
        c = summary["compare_with"]
        print(
            f"against {c['name']}: Spearman {c['spearman']:.3f} over all variants, "
            f"{c['spearman_per_protein_mean']:.3f} per protein (mean); speed {c['speedup']:.1f}x the other model's "
            f"({model['seconds']:.1f} s vs {c['seconds']:.1f} s)"
        )
    return summary


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


if __name__ == "__main__":
    cli.run(main)
