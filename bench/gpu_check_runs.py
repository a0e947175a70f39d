"""The measurements of bench/gpu_check.py, as plain numbers for it to judge.

- `precision_run`: one distill.py run (fp32, --fp16 or --bf16) read back from its output folder:
  its summary.json, the train losses of metrics.jsonl, the GradScaler state in the final
  checkpoint's training_state.pt and the steps it had to skip.
- `torchrun_run` / `resume_run`: distill.py under `python -m torch.distributed.run` (torchrun),
  and a copy of one of its checkpoints continued with --resume auto under another launcher or
  process count.
- `teacher_agreement`: top-1 agreement of the --use_8bit teacher's logits (bitsandbytes on
  CUDA, torch's dynamic int8 on CPU) with the fp32 teacher's on masked antibody positions.
- `speed_runs`: training tokens/s with the live fp32 teacher and with the teacher cache, and
  peak GPU memory, at several student sizes, through bench_distill.py's pieces.

Root scripts run only as subprocesses; this module imports pepemb and bench modules.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import bench_distill  # noqa: E402
from pepemb import data  # noqa: E402
from pepemb.data import IGNORE_INDEX, MaskedBatches, Masking, batch_loader  # noqa: E402
from pepemb.options import masking, teacher_source, training_sequences  # noqa: E402
from pepemb.speed import MB, synchronize  # noqa: E402
from pepemb.teacher import ANTIBERTY, load_teacher  # noqa: E402
from pepemb.teacher_targets import load_teacher_targets  # noqa: E402

RESUMED = re.compile(r"resumed from (\S+) at step (\d+) \(epoch (\d+), batch (\d+)\)")
SKIPPED = "non-finite loss at step"  # distill.py's warning for a step it skipped


# --------------------------------------------------------------------------------------------
# distill.py as a subprocess
# --------------------------------------------------------------------------------------------


def launcher(processes: int | None) -> list[str]:
    """How distill.py is started: `python distill.py` (None) or torchrun with `processes` per node."""
    script = str(REPO / "distill.py")
    if processes is None:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), script]


def distill_command(settings, output_dir: Path, *extra: str, processes: int | None = None) -> list[str]:
    """distill.py on the check's data, teacher, device and student (settings.student: size flags,
    none for distill.py's defaults), writing to output_dir; `extra` flags last."""
    return [
        *launcher(processes),
        "--data_path",
        str(settings.fasta),
        "--teacher_model",
        ANTIBERTY,
        "--device",
        settings.device,
        "--max_seq_len",
        str(settings.max_seq_len),
        "--batch_size",
        str(settings.batch_size),
        "--num_epochs",
        "1000",  # --max_steps ends every run
        "--output_dir",
        str(output_dir),
        *settings.student,
        *extra,
    ]


def timeout_of(settings) -> float:
    """A subprocess's time: settings.timeout_s, cut to what is left before settings.deadline
    (time.monotonic()), but at least 10 s."""
    return max(10.0, min(settings.timeout_s, settings.deadline - time.monotonic()))


def run_logged(command: list[str], log: Path, timeout_s: float) -> dict:
    """Run a command from the repository root, its output (stdout and stderr) kept in `log`;
    after timeout_s its whole session (torchrun and its workers) is killed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the AntiBERTy teacher is local: no Hub probes
    start = time.perf_counter()
    job = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = job.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        timed_out = True
    log.write_text(output)
    return {
        "command": " ".join(command),
        "returncode": job.returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - start,
        "log": str(log),
        "output": output,
    }


def error_tail(output: str, lines: int = 3) -> str:
    """The last non-empty lines of a failed run's output (its error), joined."""
    return " | ".join([line.strip() for line in output.splitlines() if line.strip()][-lines:])


def read_run(output_dir: Path, result: dict) -> dict:
    """A finished (or failed) distill.py run's numbers: what its output folder and log say."""
    output = result.pop("output")
    run = {**result, "skipped_steps": output.count(SKIPPED), "output_dir": str(output_dir)}
    if result["returncode"] != 0:
        run["error"] = "timed out" if result["timed_out"] else error_tail(output)
    resumed = RESUMED.search(output)
    run["resumed_at_step"] = int(resumed.group(2)) if resumed else None
    summary_file = output_dir / "summary.json"
    if not summary_file.is_file():
        return run
    summary = json.loads(summary_file.read_text())
    final = summary["final_val"]
    records = [json.loads(line) for line in open(output_dir / "metrics.jsonl") if line.strip()]
    losses = [r["loss"] for r in records if r.get("split") == "train"]
    state = torch.load(Path(summary["last_checkpoint"]) / "training_state.pt", map_location="cpu", weights_only=True)
    return {
        **run,
        "steps": summary["steps"],
        "processes": summary["processes"],
        "batches_per_step": summary["batches_per_step"],
        "precision": summary["precision"],
        "teacher_backend": summary["teacher_backend"],
        "val_masked_acc": final["masked_acc"],
        "val_loss": final["loss"],
        "teacher_masked_acc": final["teacher_masked_acc"],
        "val_agreement": final["agreement"],
        "train_records": len(losses),
        "nonfinite_train_losses": sum(not math.isfinite(x) for x in losses),
        "last_train_loss": losses[-1] if losses else None,
        "scaler": {k: float(v) for k, v in state["scaler"].items()},
        "checkpoint_position": state["position"],
    }


def precision_run(precision: str, settings, workdir: Path) -> dict:
    """settings.steps steps of distill.py in fp32, fp16 or bf16; evaluated and saved at the end."""
    flags = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}[precision]
    output_dir = workdir / precision
    steps = str(settings.steps)
    command = distill_command(
        settings,
        output_dir,
        *("--max_steps", steps, "--eval_every", steps, "--save_every", steps, "--log_every", "10"),
        *("--keep_last", "1", "--overwrite", *flags),
    )
    return read_run(output_dir, run_logged(command, workdir / f"{precision}.log", timeout_of(settings)))


# --------------------------------------------------------------------------------------------
# torchrun and resume
# --------------------------------------------------------------------------------------------

# Without dropout, 1 process accumulating 2 micro-batches and 2 processes taking 1 each train on
# the same global batches: a resume on either count must land where the other went.
RESUME_FLAGS = ("--dropout", "0", "--log_every", "1")


def torchrun_run(settings, workdir: Path) -> dict:
    """`torchrun --nproc_per_node 1 distill.py`, settings.resume_steps steps of 1 x 2
    micro-batches, checkpoints halfway and at the end (all kept)."""
    steps, output_dir = settings.resume_steps, workdir / "torchrun_1"
    command = distill_command(
        settings,
        output_dir,
        *RESUME_FLAGS,
        *("--max_steps", str(steps), "--save_every", str(steps // 2), "--eval_every", str(steps)),
        *("--keep_last", "0", "--grad_accumulation_steps", "2", "--overwrite"),
        processes=1,
    )
    run = read_run(output_dir, run_logged(command, workdir / "torchrun_1.log", timeout_of(settings)))
    run["halfway_checkpoint"] = str(output_dir / f"checkpoint-{steps // 2}")
    return run


def resume_run(settings, workdir: Path, first: dict, processes: int | None) -> dict:
    """first's halfway checkpoint, copied to a folder of its own and continued to the end with
    --resume auto: by one process without a launcher (None) accumulating 2 micro-batches, or by
    torchrun with `processes` (2: NCCL on CUDA) taking 2 / processes each."""
    name = "resume_plain" if processes is None else f"resume_torchrun_{processes}"
    output_dir, checkpoint = workdir / name, Path(first["halfway_checkpoint"])
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    if not checkpoint.is_dir():
        return {"returncode": None, "error": f"no checkpoint {checkpoint} to resume from", "resumed_at_step": None}
    shutil.copytree(checkpoint, output_dir / checkpoint.name)
    accumulate = 2 // (processes or 1)
    command = distill_command(
        settings,
        output_dir,
        *RESUME_FLAGS,
        *("--max_steps", str(settings.resume_steps), "--save_every", str(settings.resume_steps // 2)),
        *("--eval_every", str(settings.resume_steps), "--keep_last", "0"),
        *("--grad_accumulation_steps", str(accumulate), "--resume", "auto"),
        processes=processes,
    )
    return read_run(output_dir, run_logged(command, workdir / f"{name}.log", timeout_of(settings)))


# --------------------------------------------------------------------------------------------
# The 8-bit teacher
# --------------------------------------------------------------------------------------------


def masked_predictions(teacher, batches: MaskedBatches) -> dict:
    """The teacher's top-1 token, its margin over the second (logits) and the true token at every
    masked position of the batches, in order, on the CPU."""
    top1, margin, labels = [], [], []
    for i in range(len(batches)):
        batch = batches[i]
        masked = batch["labels"] != IGNORE_INDEX
        logits = teacher(batch["input_ids"], batch["attention_mask"])["logits"][masked.to(teacher.device)]
        best = logits.float().topk(2, dim=-1)
        top1.append(best.indices[:, 0].cpu())
        margin.append((best.values[:, 0] - best.values[:, 1]).cpu())
        labels.append(batch["labels"][masked])
    return {"top1": torch.cat(top1), "margin": torch.cat(margin), "labels": torch.cat(labels)}


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of positions where two teachers' top-1 tokens are the same."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} positions: not the same batches")
    return float((a == b).float().mean()) if len(a) else float("nan")


def teacher_agreement(settings, device: torch.device) -> dict:
    """The --use_8bit teacher against the fp32 one (and, on CUDA, the fp16 one that --fp16 and
    --bf16 runs load) on the first settings.agreement_chains chains of settings.fasta, masked as
    validation masks them (fixed masks, N-terminal crop)."""
    chains = [p.sequence for p in data.read_fasta(settings.fasta)][: settings.agreement_chains]
    reference = load_teacher(ANTIBERTY, device=device)
    batches = MaskedBatches(
        chains, reference.tokenizer, Masking(max_seq_len=settings.max_seq_len, batch_size=64, seed=42), 0, train=False
    )
    fp32 = masked_predictions(reference, batches)
    del reference
    quantized = load_teacher(ANTIBERTY, device=device, use_8bit=True)
    int8 = masked_predictions(quantized, batches)
    result = {
        "backend": quantized.backend,
        "chains": len(chains),
        "masked_positions": len(fp32["top1"]),
        "agreement": top1_agreement(fp32["top1"], int8["top1"]),
        "fp32_masked_acc": top1_agreement(fp32["top1"], fp32["labels"]),
        "int8_masked_acc": top1_agreement(int8["top1"], int8["labels"]),
        # positions where the fp32 teacher's first two tokens are within 0.1 / 0.5 logits
        "near_ties_0.1": float((fp32["margin"] < 0.1).float().mean()),
        "near_ties_0.5": float((fp32["margin"] < 0.5).float().mean()),
    }
    del quantized
    if device.type == "cuda":  # for comparison: the fp16 teacher of --fp16 and --bf16 runs
        half = load_teacher(ANTIBERTY, device=device, half=True)
        result["fp16_agreement"] = top1_agreement(fp32["top1"], masked_predictions(half, batches)["top1"])
        del half
    release(device)
    return result


def release(device: torch.device) -> None:
    """Give the memory of models deleted back to the GPU, for the subprocesses that run next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# tokens/s and peak memory: bench_distill.py's data, cache fill and trainer
# --------------------------------------------------------------------------------------------


def speed_runs(settings, device: torch.device, workdir: Path) -> dict:
    """Per student size in settings.speed_sizes: training tokens/s and peak memory with the live
    fp32 teacher and with the teacher cache, which the fp32 teacher fills once for all sizes."""
    batching = {
        "max_seq_len": settings.max_seq_len,
        "batch_size": settings.batch_size,
        "batches": settings.speed_batches,
    }
    data_dir = bench_distill.write_data(workdir / "speed_data", Path(settings.fasta), batching, fill_crop=False)
    cache_dir = workdir / "speed_cache"
    fill_args = bench_distill.distill_args(data_dir, ANTIBERTY, batching, settings.speed_sizes[0], cache_dir)
    train_seqs, val_seqs = training_sequences(fill_args)
    fill, epoch = bench_distill.fill_cache(fill_args, train_seqs, val_seqs, device)
    sizes = []
    for student in settings.speed_sizes:
        modes = {}
        for mode, cache in (("live fp32", None), ("cached", cache_dir)):
            args = bench_distill.distill_args(data_dir, ANTIBERTY, batching, student, cache)
            targets = load_teacher_targets(
                teacher_source(args), masking(args), train_seqs, val_seqs, device, half=False, variants={0}
            )
            modes[mode] = {**timed_steps(args, targets, epoch, device), "teacher_loaded": targets.teacher is not None}
            parameters = modes[mode].pop("student_parameters")
            del targets
            release(device)
        sizes.append({"student": student, "student_parameters": parameters, **modes})
    return {"batching": batching, "cache_fill": fill, "sizes": sizes}


def timed_steps(args, targets, epoch: MaskedBatches, device: torch.device) -> dict:
    """A student trained on every batch of the epoch in turn, as distill.py steps (fp32,
    bench_distill.TimedTrainer); the first step is a warm-up. Peak memory: CUDA's
    max_memory_allocated over the timed steps (teacher, student, optimizer state and
    activations), None on CPU."""
    n = len(epoch)
    trainer = bench_distill.TimedTrainer(args, targets.tokenizer, n, device)
    loader = iter(batch_loader(epoch, range(n), 0))
    trainer.step(loader, targets, 0)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(n - 1):
        trainer.step(loader, targets, 0)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(epoch[i]["attention_mask"].sum()) for i in range(1, n))
    return {
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / (n - 1),
        "timed_steps": n - 1,
        "tokens": tokens,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None,
        "student_parameters": trainer.student.num_parameters(),
    }
