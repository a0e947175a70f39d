"""The fidelity benchmark's training runs: the data split every run shares, the teacher caches
filled before the runs (timed alone), and one distill.py subprocess per run, whose record
(command, steps, times, teacher batches, validation curve) goes into fidelity.json.

Functions here take the benchmark's resolved arguments (fidelity.resolve_args) as `args`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from fidelity_variants import Budget, Variant, size_label
from pepemb import data
from pepemb.cli import UserError
from student_runs import SEED, cache_flags, log_tail, run_logged, script_command
from student_runs import distill_command as student_command

HELD_OUT = 0.1  # of the chains, for test and for validation each
TEST_SEQUENCES, VAL_SEQUENCES = 1000, 500  # at most: a larger set trains on the rest


def prepare_data(folder: Path, fasta: Path, quick: bool) -> dict:
    """Write folder/{train,val,test}.fasta from `fasta`: a tenth of its chains each for test and
    validation, at most TEST_SEQUENCES and VAL_SEQUENCES; returns the file, a note on it and the
    counts."""
    proteins = data.read_fasta(fasta)
    val_fraction = min(HELD_OUT, VAL_SEQUENCES / len(proteins))
    test_fraction = min(HELD_OUT, TEST_SEQUENCES / len(proteins))
    train, val, test = data.split_proteins(proteins, val_fraction, test_fraction, seed=SEED)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val), ("test", test)):
        data.write_fasta(folder / f"{name}.fasta", part)
    shipped = fasta.resolve() == data.SHIPPED_ANTIBODIES.resolve()
    note = ("--quick: " if quick else "") + (
        f"shipped {len(proteins):,}-chain sample" if shipped else f"{len(proteins):,}-chain antibody set"
    )
    return {"source": str(fasta), "note": note, "train": len(train), "val": len(val), "test": len(test)}


def sized_data(data_dir: Path, size: int | None) -> Path:
    """The data folder of a training-set size: the first `size` chains of the training split in a
    fixed shuffled order (so a smaller set is part of every larger one), the same val and test."""
    if size is None:
        return data_dir
    folder = data_dir.with_name(f"{data_dir.name}-n{size}")
    train = data.read_fasta(data_dir / "train.fasta")
    if size > len(train):
        raise UserError(f"--train_sizes {size}: the training split has only {len(train):,} chains")
    if not (folder / "train.fasta").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data.write_fasta(folder / "train.fasta", random.Random(SEED).sample(train, len(train))[:size])
        for name in ("val", "test"):
            shutil.copyfile(data_dir / f"{name}.fasta", folder / f"{name}.fasta")
    return folder


def distill_command(
    variant: Variant, budget: Budget, run_dir: Path, cache_dir: Path | None, args, data_dir: Path
) -> list[str]:
    """The distill.py command of one run: the variant's loss, the budget, the cache it reads (if any)."""
    command = student_command(
        _cache_flags(args, data_dir),
        variant.loss,
        run_dir,
        d_model=args.d_model,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        budget=budget.flags,
        num_epochs=1000,
        eval_every=args.eval_every,
        log_every=5,
        **checkpoint_flags(args.score_steps),
    )
    if cache_dir is not None:
        command += ["--teacher_cache", str(cache_dir)]
    if args.max_steps and budget.steps is None:
        command += ["--max_steps", str(args.max_steps)]
    return command


def checkpoint_flags(score_steps: list[int]) -> dict:
    """Keep every checkpoint at a multiple of the steps' greatest common divisor when checkpoints
    along the run are scored; else only the last."""
    if not score_steps:
        return {}
    return {"save_every": math.gcd(*score_steps), "keep_last": 0}


def _cache_flags(args, data_dir: Path) -> list[str]:
    return cache_flags(data_dir, device=args.device, batch_size=args.batch_size, mask_variants=args.mask_variants)


def fill_cache(cache_dir: Path, positions: str, args, data_dir: Path) -> dict:
    """Fill a teacher cache with cache_teacher.py (timed); a cache already complete is reused
    with the record of its fill."""
    record_path = cache_dir.with_name(cache_dir.name + ".fill.json")
    if record_path.is_file():
        return json.loads(record_path.read_text())
    shutil.rmtree(cache_dir, ignore_errors=True)  # a half-filled one: time a whole fill
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    command = script_command(
        "cache_teacher.py",
        *_cache_flags(args, data_dir),
        "--distill_positions",
        positions,
        "--teacher_cache",
        str(cache_dir),
    )
    print(
        f"filling the teacher cache {cache_dir} ({positions} positions, {args.mask_variants} mask variant(s))",
        flush=True,
    )
    status, seconds, cpu_seconds = run_logged(command, cache_dir.with_name(cache_dir.name + ".fill.log"))
    if status:
        raise UserError(
            f"cache_teacher.py failed (exit {status}); see {cache_dir.name}.fill.log:\n"
            + log_tail(cache_dir.with_name(cache_dir.name + ".fill.log"))
        )
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    record = {
        "dir": str(cache_dir),
        "positions": positions,
        "mask_variants": args.mask_variants,
        "fill_s": seconds,
        "fill_cpu_s": cpu_seconds,
        "command": " ".join(command),
        "complete": manifest["complete"],
        "bytes": sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file()),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"  filled in {seconds / 60:.1f} min", flush=True)
    return record


def learning_curve(metrics_path: Path, end_s: float) -> list[dict]:
    """The validation records with the training time at which each was taken: their own
    elapsed_s, else interpolated from the train records' elapsed_s (0 at step 0; end_s for a
    final evaluation after the last train record)."""
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [(0, 0.0)] + [(r["step"], r["elapsed_s"]) for r in records if r["split"] == "train"]
    steps, seconds = zip(*train)
    return [
        {
            "step": r["step"],
            "elapsed_s": r.get("elapsed_s", float(np.interp(r["step"], steps, seconds, right=end_s))),
            "masked_acc": r["masked_acc"],
            "agreement": r["agreement"],
            "kl": r["kl"],
            "perplexity": r["perplexity"],
        }
        for r in records
        if r["split"] == "val"
    ]


def tokens_per_second(metrics_path: Path) -> float | None:
    """Training tokens/s over the run (the mean of the logged windows, all of equal step count)."""
    rates = [
        r["tokens_per_s"]
        for r in map(json.loads, open(metrics_path))
        if r["split"] == "train" and r.get("tokens_per_s")
    ]
    return float(np.mean(rates)) if rates else None


def run_dir_of(variant: Variant, budget: Budget, repeat: int, size: int | None, args) -> Path:
    return (
        args.output_dir
        / "runs"
        / (f"{variant.name}-{budget.slug}" + (f"-n{size}" if size else "") + (f"-r{repeat}" if repeat > 1 else ""))
    )


def prefilled_cache(variant: Variant, size: int | None, args, data_dir: Path, caches: dict) -> dict:
    """The fill record of the prefilled cache the variant reads (filled now if missing)."""
    key = f"{variant.positions}-k{args.mask_variants}" + (f"-n{size}" if size else "")
    if key not in caches:
        caches[key] = fill_cache(args.output_dir / "caches" / key, variant.positions, args, sized_data(data_dir, size))
    return caches[key]


def train(variant: Variant, budget: Budget, repeat: int, size: int | None, args, data_dir: Path, caches: dict) -> dict:
    """One distill.py run; returns its record (without test scores). Prefilled caches must be
    in `caches` already: runs may go on in parallel."""
    run_dir = run_dir_of(variant, budget, repeat, size, args)
    cache_dir, fill = None, None
    if variant.cache == "prefilled":
        fill = prefilled_cache(variant, size, args, data_dir, caches)  # filled by main() before any run starts
        cache_dir = Path(fill["dir"])
    elif variant.cache == "fill":
        cache_dir = run_dir.with_name(run_dir.name + "-cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
    command = distill_command(variant, budget, run_dir, cache_dir, args, sized_data(data_dir, size))
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    print(
        f"{variant.name}, {budget.label}, {size_label(size)} training chains"
        + (f", repeat {repeat}" if repeat > 1 else "")
        + f": {variant.about} (load average {load_before:.2f})",
        flush=True,
    )
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    status, process_s, process_cpu_s = run_logged(command, run_dir / "log.txt", threads)
    record = {
        "variant": variant.name,
        "about": variant.about,
        "budget_min": budget.minutes,
        "budget_steps": budget.steps,
        "repeat": repeat,
        "train_size": size,
        "mask_variants": args.mask_variants,
        "command": " ".join(command),
        "threads": threads,
        "process_s": process_s,
        "process_cpu_s": process_cpu_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    if status:
        print(f"  {variant.name}, {budget.label} failed (exit {status}):\n{log_tail(run_dir / 'log.txt')}", flush=True)
        return {**record, "error": f"exit {status}: {log_tail(run_dir / 'log.txt')}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    end_s = summary["elapsed_s"] if budget.minutes is None else min(summary["elapsed_s"], budget.minutes * 60)
    record.update(
        steps=summary["steps"],
        training_s=summary["elapsed_s"],
        tokens_per_s=tokens_per_second(run_dir / "metrics.jsonl"),
        teacher_loaded=summary["teacher_loaded"],
        teacher_batches=summary["teacher_batches"],
        cache_fill_s=fill["fill_s"] if fill and variant.teacher_in_loss else None,
        final_val=summary["final_val"],
        # the last step ends once the budget is spent; the final evaluation comes after it
        curve=learning_curve(run_dir / "metrics.jsonl", end_s),
        checkpoint=summary["last_checkpoint"],
    )
    return record


def trained(todo, args, data_dir: Path, caches: dict):
    """The records of the runs in `todo` as they finish. One at a time, each run has the machine
    to itself: the caller scores it before the next starts. With --jobs J, J run at once."""
    if args.jobs == 1:
        for variant, budget, repeat, size in todo:
            yield train(variant, budget, repeat, size, args, data_dir, caches)
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        running = [pool.submit(train, *run, args, data_dir, caches) for run in todo]
        for finished in as_completed(running):
            yield finished.result()
