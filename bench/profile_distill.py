"""Where a cached-teacher distillation step spends its time, and what prototype fixes buy.

    python bench/profile_distill.py --quick     # under 2 minutes on 2 CPU cores
    python bench/profile_distill.py             # more steps

With the teacher cache the teacher's cost is gone, so whatever is not the student shows. The
setting is by default run_test_distillation.sh's offline preset: AntiBERTy's cache on the shipped
antibody sample, a d_model 128, 4-head, 4-layer student, --batch_size 32, --max_seq_len 160
(--d_model, --num_heads, --num_layers, --batch_size change the student and batch). Steps are
bench_distill.TimedTrainer.step: distill.py's step (pepemb/training_step.py's forward_backward +
optimizer_step), timed phase by phase.

1. Phases of the step (ms and share), over every timed step of the baseline.
2. torch.profiler: the operators with the most self CPU time over a few steps.
3. Prototypes, each a trainer of its own fed the same batches, interleaved step by step with
   the baseline (order rotated each step):
     fused AdamW        torch.optim.AdamW(..., fused=True) instead of the per-parameter loop;
     no per-step syncs  the window sums kept as tensors (no int()/float() per step; read when a
                        metrics record is written), masked_metrics' counts left as tensors;
     both               the two together;
     no attention-probability dropout   (a model change, not an overhead: architecture.py's
                        SelfAttention with dropout_p 0; the other dropouts unchanged).
Prints tables and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench_distill import TimedTrainer, distill_args, fill_cache, run_interleaved, write_data  # noqa: E402
from pepemb import data  # noqa: E402
from pepemb.data import batch_loader  # noqa: E402
from pepemb.options import masking, teacher_source, training_sequences  # noqa: E402
from pepemb.teacher_targets import load_teacher_targets  # noqa: E402
from pepemb.training_step import batch_targets, optimizer_step, student_backward  # noqa: E402

SETTINGS = {"max_seq_len": 160, "batch_size": 32}
STUDENT = {"d_model": 128, "num_heads": 4, "num_layers": 4}
MODEL_PHASES = ("student forward", "loss", "backward", "clip", "optimizer")


class SyncFreeTrainer(TimedTrainer):
    """Prototype: distill.py's step with the window sums kept as tensors (no int()/float()
    per step): forward_backward's pieces with another window update. The isfinite check stays:
    skipping a bad step needs its answer."""

    def step(self, loader, targets, variant: int) -> None:
        laps, trainer = self.laps, self.trainer
        laps.start()
        batch = next(loader)
        laps.lap("batch (loader)")
        batch, t = batch_targets(trainer, batch, targets, variant, True, laps.lap)
        out, terms = student_backward(trainer, batch, t, lap=laps.lap)
        self.accumulate(self.window, batch, out, t, terms)
        laps.lap("metrics + window sums")
        if not bool(torch.isfinite(terms["loss"])):
            raise RuntimeError("non-finite loss in a benchmark step")
        optimizer_step(trainer, lap=laps.lap)

    def accumulate(self, window: dict, batch: dict, out: dict, t: dict, terms: dict) -> None:
        masked = batch["labels"] != data.IGNORE_INDEX
        s_pred = out["logits"].detach()[masked].argmax(-1)
        t_pred = t["logits"][masked].argmax(-1)
        n = masked.sum()
        window["tokens"] += batch["attention_mask"].sum()
        window["seqs"] += batch["input_ids"].shape[0]
        window["masked"] += n
        window["correct"] += (s_pred == batch["labels"][masked]).sum()
        window["agree"] += (s_pred == t_pred).sum()
        for k in ("loss", "kl", "ce", "cos"):
            window[k] += terms[k].detach() * n


def make_trainers(args, tokenizer, total_steps, device) -> dict[str, TimedTrainer]:
    trainers = {
        "baseline": TimedTrainer(args, tokenizer, total_steps, device),
        "fused AdamW": TimedTrainer(args, tokenizer, total_steps, device, {"fused": True}),
        "no per-step syncs": SyncFreeTrainer(args, tokenizer, total_steps, device),
        "fused AdamW + no syncs": SyncFreeTrainer(args, tokenizer, total_steps, device, {"fused": True}),
        "no attention-prob dropout": TimedTrainer(args, tokenizer, total_steps, device),
    }
    for block in trainers["no attention-prob dropout"].student.blocks:
        block.attn.dropout = 0.0
    return trainers


def top_operators(trainer: TimedTrainer, loader, targets, steps: int, rows: int) -> tuple[list[dict], str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step(loader, targets, 0)
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    top = [
        {
            "operator": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in averages[:rows]
    ]
    return top, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 batches, 8 timed steps per variant")
    p.add_argument("--d_model", type=int, default=STUDENT["d_model"], help="student hidden size")
    p.add_argument("--num_heads", type=int, default=STUDENT["num_heads"], help="student attention heads")
    p.add_argument("--num_layers", type=int, default=STUDENT["num_layers"], help="student blocks")
    p.add_argument("--batch_size", type=int, default=SETTINGS["batch_size"], help="sequences per batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's default (see bench_distill.py)")
    p.add_argument("--output", default=str(REPO / "outputs" / "bench" / "profile_distill.json"), help="JSON results")
    return p.parse_args(argv)


def measure(batch_size: int, student: dict, batches: int, steps: int, device) -> dict:
    """Fill an AntiBERTy cache of `batches` batches, then time `steps` steps of every trainer
    (after one warm-up), interleaved, and profile 3 more steps of the baseline."""
    with tempfile.TemporaryDirectory(prefix="profile_distill-") as workdir:
        workdir = Path(workdir)
        settings = {**SETTINGS, "batch_size": batch_size, "batches": batches}
        data_dir = write_data(workdir / "data", data.SHIPPED_ANTIBODIES, settings, fill_crop=False)
        args = distill_args(data_dir, "antiberty", settings, student, workdir / "cache")
        train_seqs, val_seqs = training_sequences(args)
        fill, epoch = fill_cache(args, train_seqs, val_seqs, device)
        targets = load_teacher_targets(
            teacher_source(args), masking(args), train_seqs, val_seqs, device, half=False, variants={0}
        )
        n = len(epoch)
        trainers = make_trainers(args, targets.tokenizer, steps + 1, device)
        loaders = {name: iter(batch_loader(epoch, [j % n for j in range(steps + 4)], 0)) for name in trainers}

        def tasks_for_step(i):
            if i == 1:
                for trainer in trainers.values():
                    trainer.laps.reset()
            return [
                (name, lambda t=trainer, name=name: t.step(loaders[name], targets, 0), 1)
                for name, trainer in trainers.items()
            ]

        started = time.perf_counter()
        times = run_interleaved(tasks_for_step, steps + 1)
        seconds = time.perf_counter() - started
        phases = {name: trainer.laps.per_step_ms() for name, trainer in trainers.items()}
        ops, ops_table = top_operators(trainers["baseline"], loaders["baseline"], targets, 3, 20)
    tokens = sum(int(epoch[j % n]["attention_mask"].sum()) for j in range(1, steps + 1))
    parameters = trainers["baseline"].student.num_parameters()
    return {
        "fill": fill,
        "times": times,
        "seconds": seconds,
        "phases": phases,
        "ops": ops,
        "ops_table": ops_table,
        "tokens": tokens,
        "parameters": parameters,
    }


def report_phases(m: dict, batch_size: int, student: dict, steps: int) -> tuple[float, float]:
    """Print sections 1 and 2: the baseline's phases and the profiler's top operators. Returns
    the baseline's step ms and its ms outside the student's training."""
    base = m["phases"]["baseline"]
    step_ms = sum(base.values())
    print(
        f"\nAntiBERTy cache, antibody sample, batch_size {batch_size}, max_seq_len "
        f"{SETTINGS['max_seq_len']}; student {m['parameters'] / 1e6:.2f}M "
        f"({student}); {steps} timed steps "
        f"of {m['tokens'] / steps:.0f} tokens per variant after 1 warm-up ({m['seconds']:.0f} s)"
    )
    print(f"\n1. Phases of the baseline step\n{'phase':<24}{'ms/step':>9}{'share':>8}")
    for phase, ms in base.items():
        print(f"{phase:<24}{ms:>9.2f}{ms / step_ms:>8.1%}")
    not_model = sum(ms for phase, ms in base.items() if phase not in MODEL_PHASES)
    print(
        f"{'step':<24}{step_ms:>9.2f}\nnot the student's training (loader, to device, cache read, metrics, "
        f"schedule): {not_model:.2f} ms = {not_model / step_ms:.1%}; full step / student training "
        f"= {step_ms / (step_ms - not_model):.3f}"
    )

    print(
        f"\n2. torch.profiler, baseline, 3 steps: top operators by self CPU time\n"
        f"{'operator':<34}{'ms/step':>9}{'share':>8}{'calls/step':>12}"
    )
    for op in m["ops"][:15]:
        print(
            f"{op['operator'][:33]:<34}{op['self_ms_per_step']:>9.2f}{op['share']:>8.1%}{op['calls_per_step']:>12.0f}"
        )
    return step_ms, not_model


def report_variants(m: dict, steps: int) -> dict:
    """Print section 3, each prototype against the baseline; returns the variants' records."""
    times, phases = m["times"], m["phases"]
    print(
        f"\n3. Prototypes, interleaved step by step with the baseline (vs base: median over steps of the "
        f"step's time / the baseline's on the same batch, same round)\n"
        f"{'variant':<28}{'step ms':>9}{'vs base':>9}{'optimizer ms':>14}{'metrics ms':>12}"
    )
    variants = {}
    for name in phases:
        ratios = [a / b for a, b in zip(times[name], times["baseline"])]
        variants[name] = {
            "step_ms": 1000 * sum(times[name]) / steps,
            "vs_baseline": statistics.median(ratios),
            "phases_ms": phases[name],
            "tokens_per_s": m["tokens"] / sum(times[name]),
        }
        v = variants[name]
        print(
            f"{name:<28}{v['step_ms']:>9.1f}{v['vs_baseline']:>9.3f}"
            f"{phases[name]['optimizer']:>14.2f}{phases[name]['metrics + window sums']:>12.2f}"
        )
    return variants


def main(argv=None):
    args_cli = parse_args(argv)
    if args_cli.threads > 0:
        torch.set_num_threads(args_cli.threads)
    hf_logging.disable_progress_bar()
    device = torch.device("cpu")
    batches, steps = (4, 8) if args_cli.quick else (8, 32)
    student = {"d_model": args_cli.d_model, "num_heads": args_cli.num_heads, "num_layers": args_cli.num_layers}
    print(f"device cpu, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    m = measure(args_cli.batch_size, student, batches, steps, device)
    step_ms, not_model = report_phases(m, args_cli.batch_size, student, steps)
    variants = report_variants(m, steps)

    summary = {
        "quick": args_cli.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "student": student,
        **SETTINGS,
        "batch_size": args_cli.batch_size,
        "timed_steps": steps,
        "tokens_per_step": m["tokens"] / steps,
        "cache_fill": m["fill"],
        "phases_ms": m["phases"]["baseline"],
        "not_model_share": not_model / step_ms,
        "top_operators": m["ops"],
        "variants": variants,
        "step_seconds": m["times"],
    }
    output = Path(args_cli.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    output.with_suffix(".ops.txt").write_text(m["ops_table"] + "\n")
    print(f"\nwritten to {output} (and the profiler's table to {output.with_suffix('.ops.txt')})")
    return summary


if __name__ == "__main__":
    main()
