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
  saliency_sanity.png         --sanity_check: Spearman with the saliency of randomised copies
  saliency_faithfulness.png   --faithfulness: deletion curves (saliency, random, nearest residues)
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
from pathlib import Path

import numpy as np

from architecture import ResidueTokenizer
from pepemb import cli, data
from pepemb.attention import attention_figures
from pepemb.cli import UserError
from pepemb.devices import resolve_device
from pepemb.explainer import (
    Explainer,
    check_sequence,
    check_teacher,
    choose_targets,
    load_student_explainer,
    load_teacher_explainer,
)
from pepemb.fidelity import spearman
from pepemb.files import atomic_open, file_names
from pepemb.inference import DEFAULT_MAX_LENGTH
from pepemb.options import add_device_arguments
from pepemb.saliency import (
    Saliency,
    describe_steps,
    faithfulness,
    integrated_gradients,
    sanity_check,
    top_residues,
    unconverged_targets,
)
from pepemb.saliency_figures import plot_faithfulness, plot_saliency_comparison, plot_sanity, saliency_figures


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
    sequence, name = protein.sequence, explainer.name
    about = f"{protein.id}, {len(sequence)} aa"
    layer_head = (args.layer, args.head) if args.layer is not None else None
    head_stats = attention_figures(explainer, sequence, about, out_dir, written, layer_head)
    saliency = integrated_gradients(explainer, sequence, targets, args.n_steps, args.internal_batch_size)
    report_convergence(name, saliency)
    saliency_figures(saliency, sequence, name, about, out_dir, explainer.prefix, written)
    top = top_residues(saliency, sequence, args.top_k)
    print_top_residues(name, top, saliency)
    write_top_residues(out_dir / f"{explainer.prefix}important_residues.csv", top, written)
    summary = {
        "name": name,
        "head_stats": head_stats,
        "integrated_gradients": {"targets": targets, **saliency.summary()},
        "saliency_scores": saliency.scores.tolist(),
        "top_residues": top,
    }
    if args.sanity_check:
        summary["sanity_check"] = check_sanity(explainer, sequence, saliency, about, out_dir, args, written)
    if args.faithfulness:
        summary["faithfulness"] = faithfulness(explainer, sequence, saliency, seed=args.seed)
        report_faithfulness(name, summary["faithfulness"])
        plot_faithfulness(
            summary["faithfulness"],
            f"{name}: deletion test over {len(targets)} target(s) ({about})",
            out_dir / f"{explainer.prefix}saliency_faithfulness.png",
            written,
        )
    return summary, saliency


def check_sanity(
    explainer: Explainer, sequence: str, saliency: Saliency, about: str, out_dir: Path, args, written: list[Path]
) -> dict:
    """--sanity_check on --sanity_targets of the targets (IG runs again for each randomised model)."""
    subset = saliency.subset(data.evenly_spaced(list(range(len(saliency.targets))), args.sanity_targets))
    check = {
        "targets": subset.targets,
        **sanity_check(
            explainer, sequence, subset.targets, subset, seed=args.seed, internal_batch_size=args.internal_batch_size
        ),
    }
    report_sanity(explainer.name, check)
    plot_sanity(
        check,
        f"{explainer.name}: saliency after randomising the weights ({about})",
        out_dir / f"{explainer.prefix}saliency_sanity.png",
        written,
    )
    return check


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
    # ESM's 1,022 residues, as embed.py: attention maps and saliency grow with the square of the
    # length, so a 100,000-residue protein would need hundreds of GB.
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
        check_teacher(teacher, explainers[0], proteins)
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

    folders = file_names([p.id for p in proteins])
    summaries = [
        explain_sequence(
            explainers,
            protein,
            targets,
            note,
            output_dir / folder if args.fasta else output_dir,
            args,
        )
        for (protein, targets, note), folder in zip(plans, folders)
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
