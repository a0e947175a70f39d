"""Progress in logs: tqdm bars on a terminal, bounded plain lines (no carriage returns) in a file
or a pipe, for the shared helper, distill.py and the libraries' own bars."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import tiny_student, write_short_uniprot
from pepemb import progress

REPO = Path(__file__).resolve().parent.parent
LOOP = (
    "import sys; sys.path.insert(0, {repo!r}); from pepemb.progress import progress\n"
    "for _ in progress(range({n}), desc='work', unit='item'): pass\n"
)


def run_in_terminal(code: str) -> str:
    """stdout and stderr of `python -c code` attached to a pseudo-terminal."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen([sys.executable, "-c", code], stdout=child, stderr=child, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_tqdm_bar():
    output = run_in_terminal(LOOP.format(repo=str(REPO), n=200))
    assert "\r" in output and "work" in output and "200/200" in output


def test_a_pipe_gets_one_plain_line_for_a_long_fast_loop():
    result = subprocess.run(
        [sys.executable, "-c", LOOP.format(repo=str(REPO), n=100_000)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "\r" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("work: 100,000/100,000 item (done) | ")


def test_plain_lines_come_at_most_every_interval(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.PlainProgress(total=1000, desc="fill", unit="batch", every_s=30)
    for _ in range(1000):
        clock[0] += 0.1  # 100 s in all: lines at 30, 60 and 90 s, and one at the end
        bar.update(1)
    bar.set_postfix(variant=3)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == "fill: 300/1,000 batch | 10 batch/s | 0:30 elapsed | ~1:10 left"
    assert lines[-1] == "fill: 1,000/1,000 batch (done) | 10 batch/s | 1:40 elapsed | variant 3"


@pytest.mark.slow  # a 16-step distillation in a subprocess
def test_distill_writes_a_readable_log(protbert_teacher_dir, tmp_path):
    fasta = write_short_uniprot(tmp_path / "prot.fasta", 48, 40)
    command = [
        sys.executable,
        str(REPO / "distill.py"),
        "--data_path",
        str(fasta),
        "--teacher_model",
        str(protbert_teacher_dir),
        "--output_dir",
        str(tmp_path / "run"),
        *tiny_student(),
        "--batch_size",
        "8",
        "--max_seq_len",
        "32",
        "--max_steps",
        "16",
        "--log_every",
        "4",
        "--eval_every",
        "8",
        "--device",
        "cpu",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "\r" not in log and "Loading weights" not in log
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 4/16", "step 8/16", "step 12/16", "step 16/16"]
    assert all(" | acc " in line and " tok/s | " in line and line.endswith(" left") for line in steps)
    assert len(log.splitlines()) < 25
