"""One command for a GPU machine: mixed precision, the 8-bit teacher, torchrun and resume, speed.

    pip install -r requirements.txt                # once: nothing is installed at run time
    bash bench/gpu_check.sh                        # estimated 3-5 minutes on one H200, at most 8
    bash bench/gpu_check.sh --quick                # 200 steps, 20-step resume, one student size
    bash bench/gpu_check.sh --output /tmp/gpu.json --steps 600 --time_limit_s 900

Checks, in this order, on the shipped antibody chains (data/antibody_sample.fasta, split by
distill.py 80/10/10) with the AntiBERTy teacher (its weights ship in the antiberty wheel):

fp32      distill.py's default student (d_model 384, 6 heads, 4 layers) and schedule (lr 5e-4,
          100 warmup steps, linear decay), batch 32, --steps optimizer steps (400; --quick
          200) in fp32, the reference: it finishes, every logged loss is finite, no step is
          skipped, and (from 200 steps on) its validation masked accuracy reaches
          MIN_REFERENCE_ACC: it learned.
fp16      the same steps with --fp16 (autocast + GradScaler, fp16 teacher): as fp32, ran in
          float16, validation masked accuracy within ACC_TOLERANCE of fp32's, and the
          GradScaler's scale in the final checkpoint's training_state.pt positive, finite and
          not collapsed below MIN_SCALE.
bf16      the same with --bf16 (no GradScaler).
teacher_8bit   the --use_8bit teacher (bitsandbytes LLM.int8 on CUDA) against the fp32 teacher:
          top-1 agreement of their logits at the masked positions of every shipped chain
          (validation masks) at least MIN_AGREEMENT.
torchrun_1     `torchrun --nproc_per_node 1 distill.py`, 40 steps (--quick 20) of 1 process
          x 2 micro-batches, dropout off, checkpoints halfway and at the end.
resume_plain   torchrun_1's halfway checkpoint, copied and continued with --resume auto by
          `python distill.py` (no launcher): it resumes at the halfway step, finishes all steps,
          and ends within RESUME_LOSS_TOLERANCE of torchrun_1's final validation loss.
resume_torchrun_2_nccl   the same under `torchrun --nproc_per_node 2` (NCCL, 2 processes x 1
          micro-batch: the same global batch) when torch.cuda.device_count() >= 2.
speed     training tokens/s with the live fp32 teacher and with the teacher cache, and peak GPU
          memory (torch.cuda.max_memory_allocated), at 3 student sizes (bench_distill.py's
          data, cache fill and trainer); passes when every number was measured and the cached
          runs did not load the teacher.

Prints one line per check (PASSED / FAILED with the numbers / skipped) and writes every number
to one JSON file (--output, default outputs/gpu_check.json); the runs' folders and logs go to
the folder beside it (outputs/gpu_check_runs/). Exit status 0 when every check that ran passed,
1 when one failed or --time_limit_s left some unstarted, 2 without a CUDA GPU:
`error: ... needs a CUDA GPU ...`.

Thresholds, and why:
- ACC_TOLERANCE 0.03. Measured on the CPU with the settings above (AntiBERTy int8 teacher
  cache, 1,717 masked validation tokens): the fp32 reference reached val masked acc 0.559 at
  step 200, 0.658 at 300, 0.680 at 375 and 0.683 at 400: 400 steps end on the plateau.
  With the quick start's d_model-128 student, bf16 stayed within 0.005 of fp32 over steps
  100-200 (0.4246 both at 200), and fp32 itself, perturbed by one warmup step, drifted up to
  0.015 in the steep part of the curve: 0.03 is twice the largest drift seen, and fp16 keeps
  more mantissa than bf16.
- MIN_SCALE 1: the GradScaler starts at 2**16 and halves at every overflow (it grows only
  after 2,000 clean steps, more than a run here takes), so a scale below 1 means more than 16
  overflows: gradients that fp16 cannot hold.
- MIN_AGREEMENT 0.97: the fp32 teacher's top-1 and top-2 logits lie within 0.1 of each other
  at 0.7% of the masked positions and within 0.5 at 3% (300 shipped chains); torch's dynamic
  int8 agreed with fp32 at 99.7% there. Below 97%, the int8 error would have to flip
  positions whose margins are wider than 0.5 logits: broken quantization, not rounding.
- RESUME_LOSS_TOLERANCE 0.01: without dropout the resumed run takes the same batches in
  the same order as the uninterrupted one (on the CPU it ends bit for bit equal); on a GPU
  only summation order differs (DDP's all-reduce, kernel choice), expected far below 0.01.

Tests only: --allow_cpu runs the same orchestration on the CPU at tiny sizes, fp32 only (fp16,
bf16 and NCCL entries read "skipped: no CUDA"; the 8-bit teacher is torch's dynamic int8 there),
so that the report, the checks' logic and the arguments are exercised without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pepemb import data  # noqa: E402

ACC_TOLERANCE = 0.03  # |fp16 or bf16 val masked acc - fp32's| after --steps steps
MIN_SCALE = 1.0  # the GradScaler starts at 2**16 and halves at every overflow
MIN_AGREEMENT = 0.97  # top-1 agreement of the 8-bit and fp32 teachers
MIN_REFERENCE_ACC = 0.4  # fp32 val masked acc after >= 200 steps (the most frequent residue, S: 0.133)
RESUME_LOSS_TOLERANCE = 0.01  # |resumed final val loss - uninterrupted one|
GRACE_S = 60.0  # a subprocess still running this long after --time_limit_s is killed
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_SIZES = (
    {"d_model": 128, "num_heads": 4, "num_layers": 4},  # the quick start's student (0.8M)
    {"d_model": 384, "num_heads": 6, "num_layers": 4},  # distill.py's default (7.3M)
    {"d_model": 768, "num_heads": 12, "num_layers": 6},
)
TINY_STUDENT = ("--d_model", "32", "--num_heads", "2", "--num_layers", "1")


@dataclass(frozen=True)
class Settings:
    """What the checks run: device, data, batching, the precision runs' steps and student flags
    (none: distill.py's defaults), the resume runs' steps, the chains of the teacher check, the
    speed check's student sizes and batches, and the longest a subprocess may take: timeout_s,
    and never past `deadline` (time.monotonic(); main sets it GRACE_S after --time_limit_s)."""

    device: str
    gpus: int
    fasta: str
    steps: int
    batch_size: int
    max_seq_len: int
    student: tuple[str, ...]
    min_reference_acc: float
    resume_steps: int
    agreement_chains: int
    speed_sizes: tuple[dict, ...]
    speed_batches: int
    timeout_s: float = 300.0
    deadline: float = math.inf


def settings_for(args, cuda: bool, gpus: int) -> Settings:
    """The sizes of a CUDA run (full or --quick), or of the tiny CPU run (--allow_cpu)."""
    fasta = str(Path(args.fasta).resolve())
    if cuda:
        quick = args.quick
        return Settings(
            device="cuda",
            gpus=gpus,
            fasta=fasta,
            steps=args.steps or (200 if quick else 400),
            batch_size=32,
            max_seq_len=160,  # antibody V domains are 101-136 residues: nothing is cropped
            student=(),  # distill.py's default student
            min_reference_acc=MIN_REFERENCE_ACC if (args.steps or 200) >= 200 else 0.0,
            resume_steps=20 if quick else 40,
            agreement_chains=300 if quick else 1000,
            speed_sizes=DEFAULT_SIZES[1:2] if quick else DEFAULT_SIZES,
            speed_batches=11 if quick else 21,
        )
    return Settings(
        device="cpu",
        gpus=0,
        fasta=fasta,
        steps=args.steps or 4,
        batch_size=8,
        max_seq_len=48,
        student=TINY_STUDENT,
        min_reference_acc=0.0,
        resume_steps=4,
        agreement_chains=16,
        speed_sizes=(
            {"d_model": 32, "num_heads": 2, "num_layers": 1},
            {"d_model": 64, "num_heads": 2, "num_layers": 1},
        ),
        speed_batches=3,
    )


# --------------------------------------------------------------------------------------------
# Judging: each check's numbers in, a result {name, passed, summary, failures, numbers...} out
# --------------------------------------------------------------------------------------------


def outcome(name: str, failures: list[str], summary: str, **numbers) -> dict:
    return {"name": name, "passed": not failures, "summary": summary, "failures": failures, **numbers}


def skipped(name: str, reason: str) -> dict:
    return {"name": name, "passed": None, "skipped": reason}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def within(delta: float, tolerance: float) -> bool:
    """|delta| <= tolerance, a difference that prints as the tolerance included (0.42 - 0.45)."""
    return abs(delta) <= tolerance + 1e-9


def run_failures(run: dict, steps: int) -> list[str]:
    """What went wrong in a distill.py run that should have taken `steps` steps."""
    if run.get("returncode") != 0:
        return [f"distill.py exited with {run.get('returncode')}: {run.get('error', '')} (log {run.get('log')})"]
    failures = []
    if run["steps"] != steps:
        failures.append(f"stopped at step {run['steps']} of {steps}")
    if run["nonfinite_train_losses"]:
        failures.append(f"{run['nonfinite_train_losses']} of {run['train_records']} logged train losses not finite")
    if run["skipped_steps"]:
        failures.append(f"{run['skipped_steps']} steps skipped for a non-finite loss")
    if not finite(run["val_loss"]):
        failures.append(f"final val loss {run['val_loss']}")
    return failures


def judge_reference(run: dict, steps: int, min_acc: float) -> dict:
    """The fp32 run: finished, finite, and learned (val masked acc >= min_acc)."""
    failures = run_failures(run, steps)
    if not failures and run["precision"] != "float32":
        failures.append(f"ran in {run['precision']}, not float32")
    if not failures and run["val_masked_acc"] < min_acc:
        failures.append(f"val masked acc {run['val_masked_acc']:.3f} < {min_acc}: the fp32 reference did not learn")
    summary = f"val masked acc {run.get('val_masked_acc', float('nan')):.3f} after {steps} steps"
    return outcome("fp32", failures, summary, min_acc=min_acc, run=run)


def scale_failures(scale, min_scale: float) -> list[str]:
    """A GradScaler scale that is missing, not a positive finite number, or below min_scale."""
    if scale is None:
        return ["no GradScaler scale in the final checkpoint's training_state.pt"]
    if not finite(scale) or scale <= 0:
        return [f"GradScaler scale {scale} is not a positive finite number"]
    if scale < min_scale:
        return [f"GradScaler scale {scale:g} collapsed below {min_scale:g}"]
    return []


def judge_precision(
    precision: str, run: dict, reference: dict | None, steps: int, tolerance: float, min_scale: float = MIN_SCALE
) -> dict:
    """An fp16 or bf16 run against the fp32 check's result `reference`: finished and finite, in
    the right dtype, val masked acc within `tolerance` of fp32's, and for fp16 a GradScaler scale
    that is positive, finite and at least min_scale."""
    failures = run_failures(run, steps)
    finished, numbers = not failures, {"tolerance": tolerance}
    if finished and run["precision"] != PRECISION_DTYPES[precision]:
        failures.append(f"ran in {run['precision']}, not {PRECISION_DTYPES[precision]}")
    if finished and (reference is None or not reference.get("passed")):
        failures.append("no passing fp32 reference to compare with")
    elif finished:
        acc, ref = run["val_masked_acc"], reference["run"]["val_masked_acc"]
        numbers.update(val_masked_acc=acc, fp32_val_masked_acc=ref, delta=acc - ref)
        if not within(acc - ref, tolerance):
            failures.append(f"val masked acc {acc:.3f} vs fp32 {ref:.3f}: |Δ| {abs(acc - ref):.3f} > {tolerance}")
    if finished and precision == "fp16":
        scale = run["scaler"].get("scale")
        numbers.update(scale=scale, min_scale=min_scale)
        failures += scale_failures(scale, min_scale)
    return outcome(precision, failures, precision_summary(numbers), **numbers, run=run)


def precision_summary(numbers: dict) -> str:
    parts = []
    if "delta" in numbers:
        parts.append(
            f"val masked acc {numbers['val_masked_acc']:.3f} vs fp32 {numbers['fp32_val_masked_acc']:.3f} "
            f"(|Δ| {abs(numbers['delta']):.3f}, tolerance {numbers['tolerance']})"
        )
    if "scale" in numbers:
        parts.append(f"GradScaler scale {numbers['scale']}")
    return "; ".join(parts) or "not compared"


def judge_agreement(result: dict, cuda: bool, threshold: float = MIN_AGREEMENT) -> dict:
    """The 8-bit teacher: bitsandbytes on CUDA, and top-1 agreement with fp32 at least `threshold`."""
    failures = []
    if cuda and "bitsandbytes" not in result["backend"]:
        failures.append(f"the 8-bit teacher ran as {result['backend']!r}, not bitsandbytes")
    n, agreement = result["masked_positions"], result["agreement"]
    if not n:
        failures.append("no masked positions to compare")
    elif not agreement >= threshold:
        failures.append(f"top-1 agreement {agreement:.4f} < {threshold} over {n} masked positions")
    summary = f"top-1 agreement {agreement:.4f} (>= {threshold}) over {n} masked positions, {result['backend']}"
    return outcome("teacher_8bit", failures, summary, threshold=threshold, **result)


def judge_torchrun(run: dict, steps: int) -> dict:
    """The torchrun --nproc_per_node 1 run: finished as one process, its halfway checkpoint kept."""
    failures = run_failures(run, steps)
    if not failures and run["processes"] != 1:
        failures.append(f"{run['processes']} processes, expected 1")
    if not failures and not Path(run["halfway_checkpoint"]).is_dir():
        failures.append(f"no checkpoint {run['halfway_checkpoint']}")
    summary = f"{run.get('steps')} steps, final val loss {run.get('val_loss', float('nan')):.5f}"
    return outcome("torchrun_1", failures, summary, run=run)


def judge_resume(
    name: str, run: dict, first: dict, steps: int, processes: int, tolerance: float = RESUME_LOSS_TOLERANCE
) -> dict:
    """A resume of `first`'s halfway checkpoint: resumed at steps // 2 on `processes` processes,
    finished all `steps`, final val loss within `tolerance` of the uninterrupted run's."""
    failures, expected = run_failures(run, steps), steps // 2
    if run.get("resumed_at_step") != expected:
        said = "it did not say 'resumed from'" if run.get("resumed_at_step") is None else f"at {run['resumed_at_step']}"
        failures.append(f"expected a resume at step {expected}; {said}")
    numbers = {"expected_resume_step": expected, "tolerance": tolerance}
    if run.get("returncode") == 0 and run["processes"] != processes:
        failures.append(f"{run['processes']} processes, expected {processes}")
    if run.get("returncode") == 0 and finite(first.get("val_loss")):
        delta = run["val_loss"] - first["val_loss"]
        numbers.update(val_loss=run["val_loss"], uninterrupted_val_loss=first["val_loss"], delta=delta)
        if not within(delta, tolerance):
            failures.append(
                f"final val loss {run['val_loss']:.5f} vs {first['val_loss']:.5f} uninterrupted: "
                f"|Δ| {abs(delta):.2g} > {tolerance}"
            )
    elif run.get("returncode") == 0:
        failures.append("no uninterrupted run to compare with")
    summary = f"resumed at step {run.get('resumed_at_step')} on {processes} process(es), finished {run.get('steps')}"
    if "delta" in numbers:
        summary += f"; val loss |Δ| {abs(numbers['delta']):.2g} vs uninterrupted (tolerance {tolerance})"
    return outcome(name, failures, summary, **numbers, run=run)


def judge_speed(result: dict, cuda: bool) -> dict:
    """Every size and mode measured (positive finite tokens/s; peak memory on CUDA), and the
    cached runs without a teacher."""
    failures, parts = [], []
    for size in result["sizes"]:
        label = f"d_model {size['student']['d_model']}"
        for mode in ("live fp32", "cached"):
            m = size[mode]
            if not (finite(m["tokens_per_s"]) and m["tokens_per_s"] > 0):
                failures.append(f"{label} {mode}: tokens/s {m['tokens_per_s']}")
            if cuda and not (finite(m["peak_memory_mb"]) and m["peak_memory_mb"] > 0):
                failures.append(f"{label} {mode}: peak memory {m['peak_memory_mb']}")
        if size["cached"]["teacher_loaded"]:
            failures.append(f"{label}: the cached run loaded the teacher")
        live, cached = size["live fp32"], size["cached"]
        peaks = (live["peak_memory_mb"], cached["peak_memory_mb"])
        memory = f" ({peaks[0]:.0f} / {peaks[1]:.0f} MB peak)" if all(map(finite, peaks)) else ""
        parts.append(f"{label} live {live['tokens_per_s']:.0f} / cached {cached['tokens_per_s']:.0f} tokens/s{memory}")
    return outcome("speed", failures, "; ".join(parts), **result)


# --------------------------------------------------------------------------------------------
# Orchestration, report, command line
# --------------------------------------------------------------------------------------------


def planned_checks(settings: Settings, workdir: Path) -> list[tuple[str, Callable[[], dict] | None, str]]:
    """(name, check, reason skipped) in running order; a check returns its result."""
    import gpu_check_runs as runs  # transformers and the models: only once CUDA is there (or --allow_cpu)

    done, cuda = {}, settings.device == "cuda"
    device = torch.device(settings.device)

    def fp32():
        done["fp32"] = judge_reference(
            runs.precision_run("fp32", settings, workdir), settings.steps, settings.min_reference_acc
        )
        return done["fp32"]

    def lower(precision):
        run = runs.precision_run(precision, settings, workdir)
        return judge_precision(precision, run, done.get("fp32"), settings.steps, ACC_TOLERANCE)

    def torchrun_1():
        done["torchrun_1"] = runs.torchrun_run(settings, workdir)
        return judge_torchrun(done["torchrun_1"], settings.resume_steps)

    def resume(name, processes):
        run = runs.resume_run(settings, workdir, done.get("torchrun_1", {}), processes)
        return judge_resume(name, run, done.get("torchrun_1", {}), settings.resume_steps, processes or 1)

    no_cuda = "" if cuda else "no CUDA"
    two_gpus = no_cuda or ("" if settings.gpus >= 2 else f"needs 2 GPUs, found {settings.gpus}")
    return [
        ("fp32", fp32, ""),
        ("fp16", lambda: lower("fp16"), no_cuda),
        ("bf16", lambda: lower("bf16"), no_cuda),
        ("teacher_8bit", lambda: judge_agreement(runs.teacher_agreement(settings, device), cuda), ""),
        ("torchrun_1", torchrun_1, ""),
        ("resume_plain", lambda: resume("resume_plain", None), ""),
        ("resume_torchrun_2_nccl", lambda: resume("resume_torchrun_2_nccl", 2), two_gpus),
        ("speed", lambda: judge_speed(runs.speed_runs(settings, device, workdir), cuda), ""),
    ]


def run_check(name: str, check: Callable[[], dict], log: Path) -> dict:
    """The check's result with its seconds; what it prints goes to `log`; an exception is a
    failure (with its traceback)."""
    start = time.perf_counter()
    try:
        with open(log, "w") as out, contextlib.redirect_stdout(out):
            result = check()
    except Exception as err:  # a check that breaks fails; the others still run
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        result = outcome(name, [f"raised {message}"], "raised", traceback=traceback.format_exc())
    result["seconds"] = time.perf_counter() - start
    return result


def result_line(result: dict) -> str:
    if result["passed"] is None:
        return f"skipped {result['name']}: {result['skipped']}"
    if result["passed"]:
        return f"PASSED {result['name']}: {result['summary']}"
    return f"FAILED {result['name']}: {'; '.join(result['failures'])}"


def device_info(cuda: bool) -> dict:
    """Versions and devices: torch, CUDA, the GPUs, NCCL and bitsandbytes (None where absent)."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if not cuda:
        return {**info, "gpus": [], "gpu_count": 0, "cpu": platform.processor() or platform.machine()}
    count = torch.cuda.device_count()
    info.update(gpus=[torch.cuda.get_device_name(i) for i in range(count)], gpu_count=count)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:  # a tuple (2, 27, 5) in recent torch, an int in older ones
        version = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # no NCCL in this build: the 2-process check will say so
        info["nccl"] = None
    try:
        info["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        info["bitsandbytes"] = None
    return info


def assemble_report(results: dict, settings: Settings, args, info: dict, seconds: float) -> dict:
    """The JSON report: overall verdict and exit code, counts, the FAILED lines, every check."""
    values = list(results.values())
    failed = [r for r in values if r["passed"] is False]
    unstarted = [r["name"] for r in values if r.get("skipped") == "time limit"]
    lines = [result_line(r) for r in failed]
    if unstarted:
        lines.append(
            f"FAILED time limit: {', '.join(unstarted)} not started within --time_limit_s {args.time_limit_s:g}"
        )
    return {
        "passed": not lines,
        "exit_code": 1 if lines else 0,
        "counts": {
            "passed": sum(r["passed"] is True for r in values),
            "failed": len(failed),
            "skipped": sum(r["passed"] is None for r in values),
        },
        "failed": lines,
        "device": info,
        "options": {k: getattr(args, k) for k in ("steps", "quick", "allow_cpu", "time_limit_s", "output")},
        "settings": {k: v for k, v in asdict(settings).items() if k != "deadline"},
        "thresholds": {
            "acc_tolerance": ACC_TOLERANCE,
            "min_scale": MIN_SCALE,
            "min_agreement": MIN_AGREEMENT,
            "min_reference_acc": settings.min_reference_acc,
            "resume_loss_tolerance": RESUME_LOSS_TOLERANCE,
        },
        "seconds": seconds,
        "checks": results,
    }


def json_safe(value):
    """The value with non-finite floats as strings ("inf", "nan"), so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(REPO / "outputs" / "gpu_check.json"), help="the JSON report")
    p.add_argument(
        "--steps", type=positive(int), help="optimizer steps of each precision run (default 400; --quick 200)"
    )
    p.add_argument("--quick", action="store_true", help="fewer steps, one student size in the speed check")
    p.add_argument(
        "--time_limit_s",
        type=positive(float),
        default=420.0,
        help=f"start no new check after this many seconds; kill a run still going {GRACE_S:.0f} s later",
    )
    p.add_argument("--fasta", default=str(data.SHIPPED_ANTIBODIES), help="antibody chains (the shipped sample)")
    p.add_argument(
        "--allow_cpu",
        action="store_true",
        help="tests only: without CUDA, run the same checks on the CPU at tiny sizes, fp32 only",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            f"error: bench/gpu_check.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False); run it on a CUDA machine after pip install -r requirements.txt",
            file=sys.stderr,
        )
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of the in-process teachers
    settings = settings_for(args, cuda, torch.cuda.device_count() if cuda else 0)
    settings = replace(settings, deadline=time.monotonic() + args.time_limit_s + GRACE_S)
    output = Path(args.output).resolve()
    workdir = output.with_name(f"{output.stem}_runs")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    info = device_info(cuda)
    print(f"gpu_check on {', '.join(info['gpus']) or 'CPU (--allow_cpu)'}; runs and logs in {workdir}", flush=True)
    start, results = time.perf_counter(), {}
    for name, check, reason in planned_checks(settings, workdir):
        if not reason and results and time.perf_counter() - start > args.time_limit_s:
            reason = "time limit"
        results[name] = skipped(name, reason) if reason else run_check(name, check, workdir / f"{name}.out")
        print(f"[{time.perf_counter() - start:4.0f} s] {result_line(results[name])}", flush=True)
    report = assemble_report(results, settings, args, info, time.perf_counter() - start)
    write_report(report, output)
    for line in report["failed"]:
        if line.startswith("FAILED time limit"):
            print(line)
    counts = report["counts"]
    print(
        f"gpu_check {'passed' if report['passed'] else 'FAILED'}: {counts['passed']} passed, {counts['failed']} "
        f"failed, {counts['skipped']} skipped in {report['seconds']:.0f} s; report {output}"
    )
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
