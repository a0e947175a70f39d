"""Students trained and teacher caches filled for a benchmark: distill.py and cache_teacher.py as
subprocesses, each with its output in a log.

The benchmarks that compare students (fidelity.py, teacher_space.py) distil AntiBERTy (int8) on
antibody chains cropped to MAX_SEQ_LEN residues, with seed SEED. `cache_flags` are the flags
that cache_teacher.py and distill.py must agree on for a teacher cache to serve a run;
`distill_command` is a student run given them.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEACHER = "antiberty"
MAX_SEQ_LEN = 160  # antibody V domains are 101-136 residues: nothing is cropped
SEED = 42
KD = ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "2")  # distill.py's defaults
MLM = ("--distill_weight", "0", "--task_weight", "1")  # masked LM only: no teacher in the loss


def cache_flags(data_dir: Path, *, device: str, batch_size: int, mask_variants: int) -> list[str]:
    """What distill.py and cache_teacher.py must agree on for a cache to serve a run."""
    return [
        "--data_path",
        str(data_dir),
        "--teacher_model",
        TEACHER,
        "--use_8bit",
        "--device",
        device,
        "--max_seq_len",
        str(MAX_SEQ_LEN),
        "--batch_size",
        str(batch_size),
        "--seed",
        str(SEED),
        "--mask_variants",
        str(mask_variants),
    ]


def script_command(script: str, *flags: str) -> list[str]:
    """A root script (distill.py, cache_teacher.py) run by this interpreter."""
    return [sys.executable, str(REPO / script), *flags]


def distill_command(
    shared: list[str],
    loss: tuple[str, ...] | list[str],
    output_dir: Path,
    *,
    d_model: int,
    num_heads: int,
    num_layers: int,
    learning_rate: float,
    warmup_steps: int,
    budget: list[str],
    num_epochs: int,
    eval_every: int,
    log_every: int,
    save_every: int = 1_000_000,
    keep_last: int = 1,
) -> list[str]:
    """A distill.py run of one student: `shared` (cache_flags and whatever else the run shares
    with a cache), the loss flags, the student's shape and schedule, the budget (--max_time or
    --max_steps); by default only its last checkpoint is kept (keep_last 0: every one)."""
    return script_command(
        "distill.py",
        *shared,
        *loss,
        "--output_dir",
        str(output_dir),
        "--overwrite",
        "--d_model",
        str(d_model),
        "--num_heads",
        str(num_heads),
        "--num_layers",
        str(num_layers),
        "--learning_rate",
        str(learning_rate),
        "--warmup_steps",
        str(warmup_steps),
        *budget,
        "--num_epochs",
        str(num_epochs),
        "--eval_every",
        str(eval_every),
        "--log_every",
        str(log_every),
        "--save_every",
        str(save_every),
        "--keep_last",
        str(keep_last),
    )


def run_logged(command: list[str], log_path: Path, threads: int | None = None) -> tuple[int, float, float | None]:
    """Run a command from the repository with its output in log_path (on `threads` CPU threads if
    given); returns (exit status, wall seconds, CPU seconds). CPU time (user + system) does not
    grow when other jobs share the cores, wall time does; it is None when other runs go on
    alongside."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return status, time.perf_counter() - start, None if threads else _children_cpu_s() - cpu_start


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(log_path: Path, lines: int = 15) -> str:
    """The last lines of a run's log: what a failure report shows."""
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
