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
import json
import time
from pathlib import Path

import numpy as np

from pepemb import cli, data, devices
from pepemb.cli import UserError
from pepemb.files import atomic_open
from pepemb.inference import DEFAULT_MAX_LENGTH, load_embedder
from pepemb.options import add_device_arguments
from pepemb.variant_outputs import write_heatmaps, write_scores
from pepemb.variant_scores import STRATEGIES, agreement, read_mutations, scan, score


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


if __name__ == "__main__":
    cli.run(main)
