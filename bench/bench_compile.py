"""Training-step speed of the student, eager against torch.compile, with and without attention
dropout, and the share of the CPU's fp32 peak a step reaches.

    python bench/bench_compile.py                         # 128 x 4 and 384 x 4, 1 and 2 threads (~15 min)
    python bench/bench_compile.py --students 128x4 --threads 1 --steps 20

For each student (d_model x layers; 4 heads at 128, 6 at 384, as the quick start and distill.py's
default) and thread count, four copies with the same initial weights are trained on the same
batches of antibody chains (--fasta, cropped at 160, batch 32): eager, and through
`devices.compiled` (torch.compile, dynamic shapes) as `distill.py --compile` does, each with
distill.py's dropout 0.1 everywhere and with `--attention_dropout 0` (dropout elsewhere kept):
on CPU, dropout on the attention weights takes scaled_dot_product_attention off its fused kernel. A step is distill.py's own:
training_step.student_backward + optimizer_step, fused AdamW, fp32, on teacher logits given
(random: a step from the teacher cache does this work, whatever the values). The first --warmup
steps of each copy are timed apart (the compiled copies' hold their compilation); then the
copies take turns on each batch, in an order that reverses batch by batch, so that other jobs on
the machine slow them alike. Reported: the median seconds per step, steps/s, the speed-up, tokens/s, and GFLOP/s
against --peak_gflops (the machine's fp32 peak; a thread's share of it is peak x threads / cores).

FLOPs per real token of a training step (forward + backward = 3 x forward; multiply-adds count 2):
    forward = layers x (24 D^2 + 4 L D) + 2 D^2 + 2 D V
    24 D^2: q, k, v and output projections (8 D^2) and the feed-forward D -> 4D -> D (16 D^2);
    4 L D: attention scores Q K^T and the weighted sum of V over L keys (L the padded length);
    2 D^2 + 2 D V: the masked-LM head's dense layer and decoder at every position.
Norms, softmax, GELU and the optimizer are left out, so the share of the peak is a lower bound
on what the matrix work reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from architecture import Student, StudentConfig  # noqa: E402
from pepemb import cli, data  # noqa: E402
from pepemb.data import MaskedBatches, Masking  # noqa: E402
from pepemb.devices import compiled  # noqa: E402
from pepemb.losses import LossWeights  # noqa: E402
from pepemb.schedule import Optimization, optimizer_and_schedule  # noqa: E402
from pepemb.training_step import StudentTrainer, optimizer_step, student_backward  # noqa: E402

HEADS = {128: 4, 384: 6}
MAX_SEQ_LEN = 160
SEED = 42


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", default="128x4,384x4", help="comma-separated D_MODELxLAYERS [128x4,384x4]")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts [1,2]")
    p.add_argument("--steps", type=int, default=24, help="timed steps per copy [24]")
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps per copy (compilation) [4]")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--fasta", type=Path, default=data.SHIPPED_ANTIBODIES, help="antibody chains [shipped sample]")
    p.add_argument("--peak_gflops", type=float, default=175.0, help="fp32 peak of the whole CPU [175: 2-core AVX2]")
    p.add_argument("--output", type=Path, default=REPO / "outputs" / "bench" / "bench_compile.json")
    return p


def flops_per_token(d_model: int, layers: int, length: float, vocab: int) -> float:
    """Training FLOPs per real token: 3 x the forward count of the module docstring."""
    forward = layers * (24 * d_model**2 + 4 * length * d_model) + 2 * d_model**2 + 2 * d_model * vocab
    return 3 * forward


# (name, torch.compile, attention dropout: None is --dropout's 0.1)
COPIES = (
    ("eager", False, None),
    ("compiled", True, None),
    ("eager, attention dropout 0", False, 0.0),
    ("compiled, attention dropout 0", True, 0.0),
)


def trainer_for(tokenizer, d_model: int, layers: int, steps: int, compile: bool, attention_dropout) -> StudentTrainer:
    torch.manual_seed(SEED)  # every copy starts from the same weights
    config = StudentConfig.from_tokenizer(
        tokenizer,
        d_model=d_model,
        num_heads=HEADS.get(d_model, 4),
        num_layers=layers,
        attention_dropout=attention_dropout,
    )
    student = Student(config).train()
    cpu = torch.device("cpu")
    optimizer, scheduler = optimizer_and_schedule(
        [student], Optimization(learning_rate=1e-3, warmup_steps=10), cpu, steps, lambda: 0.0
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer = StudentTrainer(
        student, None, optimizer, scheduler, scaler, LossWeights(2.0, 0.9, 0.1), "masked", 1.0, cpu
    )
    if compile:
        trainer.model = compiled(student, student, MAX_SEQ_LEN)
    return trainer


def timed_step(trainer: StudentTrainer, batch: dict, logits: torch.Tensor) -> float:
    start = time.perf_counter()
    student_backward(trainer, batch, {"logits": logits})
    optimizer_step(trainer)
    return time.perf_counter() - start


def measure(batches, tokenizer, d_model: int, layers: int, args) -> dict:
    """Warm-up and timed steps of every copy on the same batches, taking turns batch by batch."""
    total = args.warmup + args.steps
    copies = {name: trainer_for(tokenizer, d_model, layers, total, c, a) for name, c, a in COPIES}
    generator = torch.Generator().manual_seed(SEED)
    logits = [torch.randn(*b["input_ids"].shape, len(tokenizer), generator=generator) for b in batches]
    warmup = {name: sum(timed_step(t, batches[i], logits[i]) for i in range(args.warmup)) for name, t in copies.items()}
    seconds = {name: [] for name in copies}
    for i in range(args.warmup, total):
        order = list(copies) if i % 2 else list(copies)[::-1]
        for name in order:
            seconds[name].append(timed_step(copies[name], batches[i], logits[i]))
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[args.warmup : total])
    length = statistics.mean(b["input_ids"].shape[1] for b in batches[args.warmup : total])
    flops = flops_per_token(d_model, layers, length, len(tokenizer))
    result = {"d_model": d_model, "layers": layers, "tokens_per_step": tokens, "flops_per_token": flops}
    eager = statistics.median(seconds["eager"])
    for name, times in seconds.items():
        median = statistics.median(times)
        result[name] = {
            "warmup_s": warmup[name],
            "median_step_s": median,
            "spread_s": [min(times), max(times)],
            "steps_per_s": 1 / median,
            "speedup": eager / median,
            "tokens_per_s": tokens / median,
            "gflops": flops * tokens / median / 1e9,
        }
    return result


def report_line(r: dict, threads: int, peak: float) -> str:
    cells = [f"{r[name]['steps_per_s']:.2f} ({r[name]['speedup']:.2f}x)" for name, _, _ in COPIES]
    best = max((r[name] for name, _, _ in COPIES), key=lambda c: c["gflops"])
    compile_s = r["compiled"]["warmup_s"] - r["eager"]["warmup_s"]
    return (
        f"| {r['d_model']} x {r['layers']} | {threads} | {r['flops_per_token'] / 1e6:.1f} | "
        + " | ".join(cells)
        + f" | {r['eager']['gflops']:.1f} ({r['eager']['gflops'] / peak:.0%}) | {best['gflops']:.1f} "
        f"({best['gflops'] / peak:.0%}) | {compile_s:.0f} s |"
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pepemb.teacher import load_teacher  # AntiBERTy's tokenizer: the antibody runs' vocabulary

    tokenizer = load_teacher("antiberty", device=torch.device("cpu")).tokenizer
    sequences = [p.sequence for p in data.read_fasta(REPO / args.fasta)]
    masking = Masking(max_seq_len=MAX_SEQ_LEN, mask_prob=0.15, seed=SEED, batch_size=args.batch_size)
    epoch = MaskedBatches(sequences, tokenizer, masking, epoch=0, train=True)
    batches = [epoch[i] for i in range(min(len(epoch), args.warmup + args.steps))]
    if len(batches) < args.warmup + args.steps:
        raise cli.UserError(f"--fasta makes {len(batches)} batches; --warmup + --steps need {args.warmup + args.steps}")
    students = [tuple(int(x) for x in s.split("x")) for s in args.students.split(",")]
    cores = os.cpu_count() or 1
    load_before, results = os.getloadavg()[0], []
    lines = [
        "| student | threads | MFLOP/token | "
        + " | ".join(f"{name}: steps/s (speed-up)" for name, _, _ in COPIES)
        + " | GFLOP/s eager (share of the threads' peak) | fastest | compilation |",
        "|---|---:|---:|" + "---:|" * len(COPIES) + "---:|---:|---:|",
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for d_model, layers in students:
            print(f"{d_model} x {layers}, {threads} thread(s)...", flush=True)
            r = {**measure(batches, tokenizer, d_model, layers, args), "threads": threads}
            results.append(r)
            lines.append(report_line(r, threads, args.peak_gflops * threads / cores))
            print(lines[-1], flush=True)
    setup = {"torch": torch.__version__, "cpus": cores, "load_before": load_before, "load_after": os.getloadavg()[0]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "setup": setup,
                "args": vars(args) | {"fasta": str(args.fasta), "output": str(args.output)},
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))
    print(f"load average {setup['load_before']:.2f} before, {setup['load_after']:.2f} after; written: {args.output}")


if __name__ == "__main__":
    cli.run(main)
