"""Distillation throughput: live fp32 teacher, live int8 teacher and teacher cache, step by step.

    python bench/bench_distill.py --quick      # under 2 minutes on 2 CPU cores
    python bench/bench_distill.py              # longer crops, bigger batches, more steps (~10 minutes)
    python bench/bench_distill.py --teachers antiberty --d_model 128 --num_heads 4

Per teacher, one student (distill.py's default: d_model 384, 6 heads, 4 layers) is trained on
the same batches three ways: with the live teacher in fp32, with the live teacher under
--use_8bit (torch dynamic int8 on CPU), and from a teacher cache that the fp32 teacher filled
beforehand (timed apart, as "cache fill"). Teachers: "protbert", random weights in ProtBert's
exact shape (teacher.save_random_teacher with PROTBERT_SHAPE and 40,000 positions, 420M
parameters, 1.7 GB written to a temporary folder and deleted after) on shipped UniProt
proteins long enough to fill the crop; "antiberty", the real offline teacher (26M parameters)
on the shipped antibody sample. Speed does not depend on the weights. Training tokens/s
counts real tokens (attention_mask), as distill.py's tokens_per_s does.

The steps go through distill.py's own pieces: MaskedBatches and batch_loader for the batches,
load_teacher_targets for the teacher (each mode loaded as a run with those flags loads it),
AdamW over adamw_param_groups with the linear warmup schedule. TimedTrainer.step is
pepemb/training_step.py's forward_backward + optimizer_step, the functions distill.py steps
with, one micro-batch a step, for one process, --grad_accumulation_steps 1 and fp32, without
the branches that run every --log_every / --eval_every / --save_every steps.

Overhead: every timed batch also goes through the teacher alone (Teacher.__call__, or the
cache read for the cached mode) and through a student training step alone (forward, loss,
backward, clipping, optimizer and schedule on given teacher logits); overhead = full step /
(teacher + student), the median over batches. What is left over is batch building, metrics and
bookkeeping.

Every variant takes its turn on batch i before any takes batch i + 1, in an order rotated batch
by batch, so a machine shared with other jobs slows them alike; the first batch is a warm-up.
The tasks without a live teacher are cheap, so they run --repeats times per batch and keep the
median. torch runs on one thread unless --threads says otherwise (see bench/README.md).
Prints a table and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from architecture import Student  # noqa: E402
from pepemb import (
    data,  # noqa: E402
    options,  # noqa: E402
)
from pepemb import teacher as teacher_module  # noqa: E402
from pepemb.data import MaskedBatches, batch_loader  # noqa: E402
from pepemb.losses import new_window  # noqa: E402
from pepemb.options import masking, teacher_source, training_sequences  # noqa: E402
from pepemb.schedule import adamw_param_groups  # noqa: E402
from pepemb.teacher_targets import load_teacher_targets  # noqa: E402
from pepemb.training_step import StudentTrainer, forward_backward, optimizer_step, student_backward  # noqa: E402

# Per teacher: its data, and per mode (quick / full) the crop, the batching and the number of
# batches (the first one a warm-up). UniProt proteins are taken at least as long as the crop, so
# every batch holds exactly max_tokens real tokens.
CONFIGS = {
    "protbert": {
        "label": "ProtBert-shaped (random weights)",
        "fasta": data.SHIPPED_UNIPROT,
        "fill_crop": True,
        "quick": {"max_seq_len": 64, "max_tokens": 256, "batches": 3},
        "full": {"max_seq_len": 128, "max_tokens": 1024, "batches": 5},
    },
    "antiberty": {
        "label": "AntiBERTy",
        "fasta": data.SHIPPED_ANTIBODIES,
        "fill_crop": False,
        "quick": {"max_seq_len": 160, "batch_size": 8, "batches": 3},
        "full": {"max_seq_len": 160, "batch_size": 32, "batches": 6},
    },
}
MODES = ("live fp32", "live int8", "cached")


class Laps:
    """Seconds per named phase, summed over steps: start() begins a step, lap(name) closes the
    phase that began at the previous lap."""

    def __init__(self):
        self.seconds, self.steps = defaultdict(float), 0
        self._last = time.perf_counter()

    def start(self):
        self.steps += 1
        self._last = time.perf_counter()

    def lap(self, name: str):
        now = time.perf_counter()
        self.seconds[name] += now - self._last
        self._last = now

    def reset(self):
        self.seconds.clear()
        self.steps = 0

    def per_step_ms(self) -> dict:
        return {k: 1000 * v / max(self.steps, 1) for k, v in self.seconds.items()}


class TimedTrainer:
    """A student trained as distill.py trains it: a training_step.StudentTrainer stepped by
    training_step.forward_backward and optimizer_step, for one process and fp32, AdamW
    (`optimizer_options` on top) with the linear warmup schedule, its phases timed by `laps`."""

    def __init__(self, args, tokenizer, total_steps: int, device: torch.device, optimizer_options: dict | None = None):
        torch.manual_seed(args.seed)  # every trainer starts from the same weights
        self.student = Student(options.student_config(args, tokenizer)).to(device).train()
        optimizer = torch.optim.AdamW(
            adamw_param_groups([self.student], args.weight_decay), lr=args.learning_rate, **(optimizer_options or {})
        )
        scheduler = get_linear_schedule_with_warmup(optimizer, min(args.warmup_steps, total_steps), total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        weights, kl, clip = options.loss_weights(args), args.distill_positions, args.max_grad_norm
        self.trainer = StudentTrainer(self.student, None, optimizer, scheduler, scaler, weights, kl, clip, device)
        self.window = new_window()
        self.laps = Laps()

    def step(self, loader, targets, variant: int) -> None:
        """One optimizer step of distill.py: the next batch off the loader to zero_grad."""
        self.laps.start()
        batch = next(loader)
        self.laps.lap("batch (loader)")
        if not forward_backward(self.trainer, batch, targets, variant, True, self.window, lap=self.laps.lap):
            raise RuntimeError("non-finite loss in a benchmark step")  # distill.py skips the step; a benchmark stops
        optimizer_step(self.trainer, lap=self.laps.lap)

    def student_step(self, batch: dict, teacher_logits: torch.Tensor) -> None:
        """The student's part of a step alone, on given teacher logits: forward, loss, backward, update."""
        self.laps.start()
        student_backward(self.trainer, batch, {"logits": teacher_logits}, lap=self.laps.lap)
        optimizer_step(self.trainer, lap=self.laps.lap)


# --------------------------------------------------------------------------------------------
# Setup: data, teacher, cache, modes
# --------------------------------------------------------------------------------------------


def per_batch(settings: dict) -> int:
    return settings.get("batch_size") or settings["max_tokens"] // settings["max_seq_len"]


def write_data(directory: Path, fasta: Path, settings: dict, fill_crop: bool) -> Path:
    """A data folder whose training split makes `batches` batches: seeded random proteins (as
    long as the crop with fill_crop), 2 for validation and 1 for test."""
    proteins = data.read_fasta(fasta)
    if fill_crop:
        proteins = [p for p in proteins if len(p.sequence) >= settings["max_seq_len"] - 2]
    proteins = random.Random(0).sample(proteins, len(proteins))
    n_train = settings["batches"] * per_batch(settings)
    directory.mkdir(parents=True)
    data.write_fasta(directory / "train.fasta", proteins[:n_train])
    data.write_fasta(directory / "val.fasta", proteins[n_train : n_train + 2])
    data.write_fasta(directory / "test.fasta", proteins[n_train + 2 : n_train + 3])
    return directory


def distill_args(
    data_dir: Path, teacher: str, settings: dict, student: dict, cache_dir: Path | None = None, use_8bit: bool = False
):
    """distill.py's parsed and validated arguments for one mode."""
    argv = [
        "--data_path",
        str(data_dir),
        "--teacher_model",
        teacher,
        "--device",
        "cpu",
        "--max_seq_len",
        str(settings["max_seq_len"]),
        *(
            ["--max_tokens", str(settings["max_tokens"])]
            if "max_tokens" in settings
            else ["--batch_size", str(settings["batch_size"])]
        ),
        *[f"--{k}={v}" for k, v in student.items()],
    ]
    if cache_dir is not None:
        argv += ["--teacher_cache", str(cache_dir), "--mask_variants", "1"]
    if use_8bit:
        argv.append("--use_8bit")
    parser = argparse.ArgumentParser()
    options.add_distill_arguments(parser)
    args = parser.parse_args(argv)
    options.validate_shared_args(args)
    options.validate_training_args(args)
    return args


def fill_cache(args, train_seqs, val_seqs, device) -> tuple[dict, MaskedBatches]:
    """Fill the cache's mask variant 0 with the fp32 teacher, as epoch 0 of a cached run would;
    returns its cost and the epoch's batches (the batches every mode trains on)."""
    filler = load_teacher_targets(
        teacher_source(args), masking(args), train_seqs, val_seqs, device, half=False, variants={0}
    )
    batching = replace(masking(args), max_seq_len=filler.max_seq_len)
    epoch = MaskedBatches(train_seqs, filler.tokenizer, batching, epoch=0, train=True, mask_variant=0)
    tokens, start = 0, time.perf_counter()
    for i in range(len(epoch)):
        batch = epoch[i]
        filler(batch, 0)
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    if not filler.cache.is_complete(0):
        raise RuntimeError("the cache fill did not complete mask variant 0")
    filler.cache.close()
    cache_bytes = sum(f.stat().st_size for f in Path(args.teacher_cache).iterdir() if f.is_file())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "batches": len(epoch),
        "sequences": len(train_seqs),
        "bytes": cache_bytes,
    }, epoch


def load_modes(data_dir, teacher, settings, student, cache_dir, train_seqs, val_seqs, device) -> dict:
    """The teacher targets of each mode, loaded as distill.py loads them with those flags."""
    modes = {}
    for mode, cache, use_8bit in (("live fp32", None, False), ("live int8", None, True), ("cached", cache_dir, False)):
        args = distill_args(data_dir, teacher, settings, student, cache, use_8bit)
        modes[mode] = load_teacher_targets(
            teacher_source(args), masking(args), train_seqs, val_seqs, device, half=False, variants={0}
        )
    if modes["cached"].teacher is not None:
        raise RuntimeError("the cached mode loaded the teacher: the cache does not serve the run")
    return modes


# --------------------------------------------------------------------------------------------
# The interleaved measurement
# --------------------------------------------------------------------------------------------


def run_interleaved(tasks_for_batch, n_batches: int) -> dict[str, list[float]]:
    """Seconds per task per batch after the warm-up batch 0, which runs every task once.
    tasks_for_batch(i) gives [(name, fn, repeats)]: every task runs once per round, in an order
    rotated round by round, a task with repeats r in the first r rounds; its time on the batch
    is the median of its r."""
    times = defaultdict(list)
    for i in range(n_batches):
        tasks = tasks_for_batch(i)
        samples = defaultdict(list)
        for round_ in range(max(r for _, _, r in tasks) if i > 0 else 1):
            due = [(name, fn) for name, fn, r in tasks if r > round_]
            k = (i + round_) % len(due)
            for name, fn in due[k:] + due[:k]:
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
        if i > 0:
            for name, seconds in samples.items():
                times[name].append(statistics.median(seconds))
    return dict(times)


def measure(modes: dict, epoch: MaskedBatches, args, device, repeats: int) -> dict:
    """Full steps of every mode, the teacher alone, the student alone and batch building,
    interleaved batch by batch. The cheap tasks (everything without a live teacher) run
    `repeats` times per batch (the cached mode trains on each batch that many times in a row)."""
    n = len(epoch)
    tokenizer = modes["cached"].tokenizer
    trainers = {mode: TimedTrainer(args, tokenizer, n * repeats, device) for mode in modes}
    alone = TimedTrainer(args, tokenizer, n * repeats, device)

    def batch_numbers(mode):  # the cached mode's steps: batch 0 (warm-up) once, the others `repeats` times
        return [0] + [j for j in range(1, n) for _ in range(repeats if mode == "cached" else 1)]

    loaders = {mode: iter(batch_loader(epoch, batch_numbers(mode), 0)) for mode in modes}

    def tasks_for_batch(i):
        if i == 1:  # the phases of the timed steps only
            for trainer in (*trainers.values(), alone):
                trainer.laps.reset()
        batch = epoch[i]
        cached_logits = modes["cached"](batch, 0)["logits"]
        tasks = [
            (
                f"{mode} step",
                lambda m=mode: trainers[m].step(loaders[m], modes[m], 0),
                repeats if mode == "cached" else 1,
            )
            for mode in modes
        ]
        tasks += [
            (f"{mode} teacher", lambda m=mode: modes[m].teacher(batch["input_ids"], batch["attention_mask"]), 1)
            for mode in modes
            if mode != "cached"
        ]
        tasks += [
            ("cached teacher", lambda: modes["cached"](batch, 0), repeats),
            ("student step", lambda: alone.student_step(batch, cached_logits), repeats),
            ("batch build", lambda: epoch[i], repeats),
        ]
        return tasks

    times = run_interleaved(tasks_for_batch, n)
    tokens = [int(epoch[i]["attention_mask"].sum()) for i in range(1, n)]
    student_s = sum(times["student step"])
    results = {}
    for mode in modes:
        step_s, teacher_s = sum(times[f"{mode} step"]), sum(times[f"{mode} teacher"])
        # per batch: step / (teacher + student), each timed on that batch, close together in time
        overheads = [
            s / (t + a) for s, t, a in zip(times[f"{mode} step"], times[f"{mode} teacher"], times["student step"])
        ]
        results[mode] = {
            "tokens_per_s": sum(tokens) / step_s,
            "step_ms": 1000 * step_s / len(tokens),
            "teacher_ms": 1000 * teacher_s / len(tokens),
            "student_ms": 1000 * student_s / len(tokens),
            "overhead": statistics.median(overheads),
            "overhead_per_batch": overheads,
            "overhead_of_totals": step_s / (teacher_s + student_s),
            "phases_ms": trainers[mode].laps.per_step_ms(),
        }
    for mode in modes:
        results[mode]["speedup_vs_live_fp32"] = results[mode]["tokens_per_s"] / results["live fp32"]["tokens_per_s"]
    return {
        "student_parameters": alone.student.num_parameters(),
        "timed_batches": len(tokens),
        "repeats": repeats,
        "tokens_per_batch": tokens,
        "modes": results,
        "student_alone_tokens_per_s": sum(tokens) / student_s,
        "batch_build_ms": 1000 * sum(times["batch build"]) / len(tokens),
        "student_alone_phases_ms": alone.laps.per_step_ms(),
        "seconds_per_batch": times,
    }


def bench_teacher(name: str, quick: bool, student: dict, device: torch.device, workdir: Path, repeats: int) -> dict:
    config = CONFIGS[name]
    settings = config["quick" if quick else "full"]
    data_dir = write_data(workdir / f"data-{name}", config["fasta"], settings, config["fill_crop"])
    if name == "protbert":
        print("writing a random ProtBert-shaped teacher (1.7 GB) ...", flush=True)
        # 40,000 positions as ProtBert has: its parameter count (the position table is idle weight).
        teacher = str(
            teacher_module.save_random_teacher(
                workdir / "protbert", max_positions=40000, **teacher_module.PROTBERT_SHAPE
            )
        )
    else:
        teacher = teacher_module.ANTIBERTY
    cache_dir = workdir / f"cache-{name}"
    cache_args = distill_args(data_dir, teacher, settings, student, cache_dir)
    train_seqs, val_seqs = training_sequences(cache_args)
    fill, epoch = fill_cache(cache_args, train_seqs, val_seqs, device)
    gc.collect()
    modes = load_modes(data_dir, teacher, settings, student, cache_dir, train_seqs, val_seqs, device)
    result = measure(modes, epoch, cache_args, device, repeats)
    about = modes["cached"].about
    return {
        "teacher": name,
        "label": config["label"],
        "teacher_parameters": about["num_parameters"],
        "data": config["fasta"].name,
        **settings,
        "train_sequences": len(train_seqs),
        "padding_efficiency": epoch.padding_efficiency,
        "cache_fill": fill,
        **result,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_report(r: dict, student: dict) -> None:
    batching = f"max_tokens {r['max_tokens']}" if "max_tokens" in r else f"batch_size {r['batch_size']}"
    tokens = r["tokens_per_batch"]
    print(
        f"\n{r['label']} teacher, {r['teacher_parameters'] / 1e6:.1f}M parameters; {r['data']}, "
        f"{r['train_sequences']} proteins, max_seq_len {r['max_seq_len']}, {batching}; student "
        f"{r['student_parameters'] / 1e6:.1f}M ({', '.join(f'{k} {v}' for k, v in student.items())}); "
        f"{r['timed_batches']} timed batches of {sum(tokens) / len(tokens):.0f} tokens after 1 warm-up"
    )
    print(
        f"{'mode':<11}{'tokens/s':>10}{'vs fp32':>9}{'step ms':>10}{'teacher ms':>12}{'student ms':>12}"
        f"{'other ms':>10}{'overhead (range)':>22}"
    )
    for mode, m in r["modes"].items():
        other = m["step_ms"] - m["teacher_ms"] - m["student_ms"]
        spread = f"{m['overhead']:.3f} ({min(m['overhead_per_batch']):.2f}-{max(m['overhead_per_batch']):.2f})"
        print(
            f"{mode:<11}{m['tokens_per_s']:>10.1f}{m['speedup_vs_live_fp32']:>8.1f}x{m['step_ms']:>10.1f}"
            f"{m['teacher_ms']:>12.1f}{m['student_ms']:>12.1f}{other:>10.1f}{spread:>22}"
        )
    fill = r["cache_fill"]
    print(
        f"teacher ms: Teacher.__call__ alone (cached: the cache read); student ms: student step alone; "
        f"overhead: median over batches of step / (teacher + student); tasks without a live teacher: median of "
        f"{r['repeats']} runs per batch.\ncache fill (once, fp32 teacher): {fill['sequences']} sequences "
        f"in {fill['seconds']:.1f} s, {fill['tokens_per_s']:.1f} tokens/s; {fill['bytes'] / 1024:.1f} KiB on disk. "
        f"Student step alone: {r['student_alone_tokens_per_s']:.0f} tokens/s; batch building "
        f"{r['batch_build_ms']:.1f} ms/batch."
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short crops, small batches, 2 timed steps per teacher")
    p.add_argument("--teachers", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="teachers to run")
    p.add_argument("--d_model", type=int, default=384, help="student hidden size (distill.py's default)")
    p.add_argument("--num_heads", type=int, default=6, help="student attention heads")
    p.add_argument("--num_layers", type=int, default=4, help="student blocks")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per batch of the tasks without a live teacher (cheap and noisy), their median kept",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 0: torch's default. 1 because on a 2-core machine shared with other "
        "jobs, 2 OpenMP threads wait on each other at every small op (AdamW's step measured "
        "100x slower at load 4.5)",
    )
    p.add_argument("--output", default=str(REPO / "outputs" / "bench" / "bench_distill.json"), help="JSON results")
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    device = torch.device("cpu")
    student = {"d_model": args.d_model, "num_heads": args.num_heads, "num_layers": args.num_layers}
    summary = {
        "quick": args.quick,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average_start": os.getloadavg(),
        "student": student,
        "teachers": {},
    }
    print(f"device cpu, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_distill-") as workdir:
        for name in args.teachers:
            summary["teachers"][name] = bench_teacher(name, args.quick, student, device, Path(workdir), args.repeats)
            gc.collect()
    summary["load_average_end"] = os.getloadavg()
    summary["seconds"] = time.perf_counter() - started
    for r in summary["teachers"].values():
        print_report(r, student)
    if "protbert" in summary["teachers"]:
        modes = summary["teachers"]["protbert"]["modes"]
        summary["cached_vs_live_protbert_fp32"] = modes["cached"]["speedup_vs_live_fp32"]
        print(f"\ncached / live ProtBert-shaped fp32: {summary['cached_vs_live_protbert_fp32']:.1f}x (target >= 10x)")
    print(
        f"load average {summary['load_average_start'][0]:.1f} at start, {summary['load_average_end'][0]:.1f} at end; "
        f"{summary['seconds']:.0f} s in all"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {output}")
    return summary


if __name__ == "__main__":
    main()
