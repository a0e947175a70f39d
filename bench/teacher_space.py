"""Teacher-space embeddings: is distilling the map (--embedding_weight) better than fitting one afterwards?

    python bench/teacher_space.py --quick        # shipped antibodies, d_model 64, 40 steps
    python bench/teacher_space.py --data_dir outputs/fidelity_regimes/data-n2000 --steps 600 --d_model 256 --jobs 3

Three students of the same size, data, seed and step count, each one distill.py subprocess (run
side by side with --jobs, one CPU thread each), all from one teacher cache that cache_teacher.py
fills with the logits and the teacher's per-protein embeddings (AntiBERTy, int8):

  kd-emb  distill.py's default KD loss + --embedding_weight W: the map is trained with the student
  kd      the same without the embedding term (masked accuracy of kd-emb should stay within a point)
  mlm     masked LM only (no teacher in training)

Every student then gets a least-squares map from its per-protein embeddings (mean last hidden state
over residues) to the teacher's, fitted on the training chains; kd-emb is also scored with its
own distilled map. On the test chains, which no run trains or validates on: masked accuracy
(fixed masks, heldout.masked_statistics), 10-NN overlap of the student's own embeddings with
the teacher's neighbourhoods, and in the teacher's space (heldout.teacher_space_measures) the
10-NN overlap, the cosine of mapped and true embeddings after centring both on the teacher's mean,
and R^2. Distillation is worth it here only if kd-emb's distilled map beats mlm + least squares.

The teacher cache and the runs are built with student_runs.py, with the flags that
fidelity.py's runs use; the least-squares map is pepemb.teacher_space.LeastSquaresMap. Writes
OUTPUT_DIR/teacher_space.json and teacher_space.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from architecture import load_student  # noqa: E402
from pepemb import (
    cli,  # noqa: E402
    data,  # noqa: E402
    fidelity,  # noqa: E402
    heldout,  # noqa: E402
)
from pepemb.cli import UserError  # noqa: E402
from pepemb.files import atomic_open  # noqa: E402
from pepemb.teacher_cache import TeacherCache  # noqa: E402
from pepemb.teacher_space import LeastSquaresMap  # noqa: E402
from student_runs import (  # noqa: E402
    KD,
    MAX_SEQ_LEN,
    MLM,
    SEED,
    TEACHER,
    cache_flags,
    distill_command,
    run_logged,
    script_command,
)

BATCH = 32
QUICK = {"steps": 40, "d_model": 64, "num_layers": 2, "train_size": 200, "output_dir": "outputs/teacher_space_quick"}
FULL = {"steps": 600, "d_model": 256, "num_layers": 4, "train_size": None, "output_dir": "outputs/teacher_space"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a smoke run on 200 shipped chains, tiny students")
    p.add_argument("--data_dir", help="folder with train/val/test.fasta [the shipped antibodies, split 80/10/10]")
    p.add_argument("--train_size", type=int, help="use the first N training chains [all; --quick 200]")
    p.add_argument("--steps", type=int, help=f"optimizer steps of every student [{FULL['steps']}]")
    p.add_argument("--d_model", type=int, help=f"student width [{FULL['d_model']}]")
    p.add_argument("--num_layers", type=int, help=f"student blocks [{FULL['num_layers']}]")
    p.add_argument("--embedding_weight", type=float, default=1.0, help="kd-emb's --embedding_weight")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--mask_variants", type=int, default=4, help="mask variants in the teacher cache")
    p.add_argument("--jobs", type=int, default=2, help="students trained at a time, one CPU thread each")
    p.add_argument("--output_dir", help=f"where everything goes [{FULL['output_dir']}]")
    return p


def resolve_args(args):
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "d_model", "num_layers", "mask_variants", "jobs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    args.output_dir = cli.writable_folder(REPO / args.output_dir, "--output_dir")
    return args


def prepare_data(args) -> Path:
    """train/val/test.fasta in OUTPUT_DIR/data: --data_dir's (or the shipped antibodies split
    80/10/10), the training split cut to its first --train_size chains."""
    folder = args.output_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if args.data_dir:
        splits = {name: data.read_fasta(Path(args.data_dir) / f"{name}.fasta") for name in ("train", "val", "test")}
    else:
        proteins = data.read_fasta(data.SHIPPED_ANTIBODIES)
        splits = dict(zip(("train", "val", "test"), data.split_proteins(proteins, 0.1, 0.1, seed=SEED)))
    splits["train"] = splits["train"][: args.train_size]
    for name, proteins in splits.items():
        data.write_fasta(folder / f"{name}.fasta", proteins)
    return folder


def shared_flags(args, data_dir: Path) -> list[str]:
    """What cache_teacher.py and every distill.py run share: student_runs.cache_flags and the cache."""
    flags = cache_flags(data_dir, device="cpu", batch_size=BATCH, mask_variants=args.mask_variants)
    return [*flags, "--teacher_cache", str(args.output_dir / "cache")]


def run(command: list[str], log: Path, threads: int | None = None) -> float:
    """Run a command with its output in `log`; returns its wall seconds; fails loudly."""
    status, seconds, _ = run_logged(command, log, threads)
    if status:
        raise UserError(f"{Path(command[1]).name} failed (exit {status}); see {log}")
    return seconds


def train_students(args, data_dir: Path) -> dict:
    """The three students' run folders (trained now unless already there)."""
    variants = {
        "kd-emb": [*KD, "--embedding_weight", str(args.embedding_weight)],
        "kd": KD,
        "mlm": MLM,
    }
    runs = {name: args.output_dir / "runs" / name for name in variants}
    todo = [name for name, folder in runs.items() if not (folder / "summary.json").is_file()]

    def train(name: str) -> None:
        print(f"training {name}", flush=True)
        runs[name].mkdir(parents=True, exist_ok=True)
        command = distill_command(
            shared_flags(args, data_dir),
            variants[name],
            runs[name],
            d_model=args.d_model,
            num_heads=4,
            num_layers=args.num_layers,
            learning_rate=args.learning_rate,
            warmup_steps=max(1, args.steps // 10),
            budget=["--max_steps", str(args.steps)],
            num_epochs=100000,
            eval_every=max(1, args.steps // 4),
            log_every=10,
        )
        run(command, runs[name] / "log.txt", threads=max(1, (os.cpu_count() or 1) // args.jobs))

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, todo))
    return runs


def pooled_embeddings(model, sequences: list[str], tokenizer) -> torch.Tensor:
    """Per-protein embeddings (mean last hidden state over residues), unmasked, evaluation's crop."""
    batches = [
        data.unmasked_batch(sequences[i : i + BATCH], tokenizer, MAX_SEQ_LEN) for i in range(0, len(sequences), BATCH)
    ]
    return heldout.last_hidden_states(model, batches, "cpu")["pooled"]


def score(runs: dict, data_dir: Path) -> dict:
    """Masked accuracy and teacher-space measures of each student on the test chains."""
    from pepemb.teacher import load_teacher

    teacher = load_teacher(TEACHER, use_8bit=True)
    train = [p.sequence for p in data.read_fasta(data_dir / "train.fasta")]
    test = [p.sequence for p in data.read_fasta(data_dir / "test.fasta")]
    targets = np.array(TeacherCache(runs["kd"].parent.parent / "cache").read_embeddings()[: len(train)])
    teacher_test = pooled_embeddings(teacher, test, teacher.tokenizer)
    masking = data.Masking(max_seq_len=MAX_SEQ_LEN, mask_prob=0.15, seed=SEED, batch_size=BATCH)
    masked = data.MaskedBatches(test, teacher.tokenizer, masking, epoch=0, train=False)
    # evaluate.py's zero-shot mutation effects at its defaults, the teacher's side once
    probe = heldout.MutationProbe(
        test,
        teacher.tokenizer,
        proteins=heldout.MUTATION_PROTEINS,
        positions=heldout.MUTATION_POSITIONS,
        seed=SEED,
        max_seq_len=MAX_SEQ_LEN,
    )
    teacher_mutations = probe.scores(teacher, "cpu")
    results = {}
    for name, folder in runs.items():
        student, tokenizer, _ = load_student(folder / "best_model")
        stats = heldout.masked_statistics(student, None, masked, "cpu")
        own = pooled_embeddings(student, test, tokenizer)
        fitted = LeastSquaresMap.fit(pooled_embeddings(student, train, tokenizer), targets)
        mutations = probe.agreement(probe.scores(student, "cpu"), teacher_mutations)
        summary = json.loads((folder / "summary.json").read_text())
        record = {
            "masked_acc": sum(stats["per_id"]["student"].tolist()) / stats["n"],
            "mutation_spearman": mutations["spearman"],
            "mutation_spearman_within_position": mutations["spearman_within_position_mean"],
            "parameters": student.num_parameters(),
            "own_space_knn_overlap": fidelity.knn_overlap(teacher_test, own, k=10),
            "least_squares_map": heldout.teacher_space_measures(torch.from_numpy(fitted(own)), teacher_test),
            "steps": summary["steps"],
            "training_s": summary[
                "elapsed_s"
            ],  # wall time; --jobs runs shared the CPUs, cpu_count // jobs threads each
        }
        if student.teacher_map is not None:
            with torch.no_grad():
                record["distilled_map"] = heldout.teacher_space_measures(student.teacher_map(own), teacher_test)
        results[name] = record
    return {
        "students": results,
        "test_chains": len(test),
        "train_chains": len(train),
        "knn_chance": fidelity.knn_overlap_chance(len(test), 10),
    }


def table(results: dict, args) -> str:
    lines = [
        f"{results['train_chains']:,} training / {results['test_chains']:,} test antibody chains; students "
        f"d_model {args.d_model} x {args.num_layers} layers, {args.steps} steps of {BATCH}; teacher {TEACHER} "
        f"(int8). 10-NN chance level {results['knn_chance']:.3f}.",
        "",
        "| student | map into the teacher's space | masked acc | mutation ρ (within position) | training min "
        "| 10-NN overlap, own space | 10-NN overlap, teacher space | centred cosine | R² | raw cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["students"].items():
        for kind in ("distilled_map", "least_squares_map"):
            if kind in r:
                m = r[kind]
                lines.append(
                    f"| {name} | {kind.replace('_', ' ')} | {r['masked_acc']:.3f} "
                    f"| {r['mutation_spearman']:.3f} ({r['mutation_spearman_within_position']:.3f}) "
                    f"| {r['training_s'] / 60:.1f} | {r['own_space_knn_overlap']:.3f} | {m['knn_overlap']:.3f} | {m['centred_cosine']:.3f} "
                    f"| {m['r2']:.3f} | {m['raw_cosine']:.3f} |"
                )
    return "\n".join(lines)


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    data_dir = prepare_data(args)
    cache = args.output_dir / "cache"
    # cache_teacher.py skips what the cache holds already: a killed fill continues
    print(f"filling the teacher cache {cache} (logits and per-protein embeddings)", flush=True)
    seconds = run(
        script_command("cache_teacher.py", *shared_flags(args, data_dir), "--embeddings"),
        args.output_dir / "cache_fill.log",
    )
    print(f"  filled in {seconds / 60:.1f} min", flush=True)
    runs = train_students(args, data_dir)
    results = {**score(runs, data_dir), "args": {k: str(v) for k, v in vars(args).items()}}
    with atomic_open(args.output_dir / "teacher_space.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_open(args.output_dir / "teacher_space.md", "w") as f:
        f.write(table(results, args) + "\n")
    print("\n" + table(results, args))
    return results


if __name__ == "__main__":
    cli.run(main)
