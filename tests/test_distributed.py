"""distill.py and cache_teacher.py as torchrun jobs: 2 CPU processes (gloo) against 1.

The 2-process jobs start as a user starts them, `python -m torch.distributed.run --standalone
--nproc_per_node 2 SCRIPT ...`. With dropout off, 2 processes x 1 micro-batch and 1 process x 2
accumulated micro-batches train on the same global batches, weighted alike: they must reach the
same weights, and a checkpoint of either must carry on in the other.

Run as a script (by torchrun, in test_a_failing_rank_ends_the_job), this file is distill.py with
rank 1 failing at its second training step.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_teacher
import distill
from architecture import load_student
from conftest import tiny_student
from pepemb import cli, data, training_step
from pepemb.checkpoints import TRAINING_STATE, list_checkpoints
from pepemb.distributed import optimizer_steps
from pepemb.options import validate_shared_args
from pepemb.schedule import planned_steps

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TRAINING = [
    *tiny_student(),
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "1",
    "--dropout",
    "0",
    "--log_every",
    "1",
    "--eval_every",
    "2",
]


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> Path:
    """80 shipped UniProt proteins cut to 40 residues: 64 train (16 batches of 4), 8 val, 8 test."""
    path = tmp_path_factory.mktemp("data") / "small.fasta"
    proteins = data.read_fasta(data.SHIPPED_UNIPROT)[:80]
    data.write_fasta(path, [data.Protein(p.id, p.description, p.sequence[:40]) for p in proteins])
    return path


def shared_flags(teacher_dir, fasta, *extra) -> list[str]:
    """Data, teacher and masking flags (distill.py's and cache_teacher.py's)."""
    return [
        "--data_path",
        str(fasta),
        "--teacher_model",
        str(teacher_dir),
        "--batch_size",
        "4",
        "--max_seq_len",
        "32",
        "--seed",
        "3",
        *extra,
    ]


def start_torchrun(script: str, argv: list[str], **popen) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGV`, in a session of its own (see torchrun)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *argv],
        cwd=REPO,
        env=ONE_THREAD,
        start_new_session=True,
        **popen,
    )


def torchrun(script: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """A 2-process job, run to its end. One that outlives `timeout` is killed with its workers
    (the whole session) and fails the test."""
    job = start_torchrun(script, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"{script} on 2 processes still running after {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_student(a).model.state_dict(), load_student(b).model.state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5, msg=name)


def records(output_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, open(output_dir / "metrics.jsonl")) if r["split"] == split]


# --------------------------------------------------------------------------------------------
# Sharding and planning: pure functions
# --------------------------------------------------------------------------------------------


def test_each_rank_takes_its_share_of_a_step_and_a_step_is_the_same_batches_on_any_count():
    # 13 batches, 2 processes x 2 accumulation: batch 12 is dropped, or rank 0 would have one more
    steps = optimizer_steps(13, 0, batches_per_step=4, world_size=2)
    assert steps == [range(0, 4), range(4, 8), range(8, 12)]
    assert [list(s[0::2]) for s in steps] == [[0, 2], [4, 6], [8, 10]]
    assert [list(s[1::2]) for s in steps] == [[1, 3], [5, 7], [9, 11]]
    # one process x 4: the same steps, plus the tail as a shorter last step
    assert optimizer_steps(13, 0, 4, 1) == steps + [range(12, 13)]
    # resumed at batch 6 on 3 processes x 1: 7 batches left, 1 dropped
    assert optimizer_steps(13, 6, 3, 3) == [range(6, 9), range(9, 12)]
    for n in range(1, 30):
        for world_size in (1, 2, 3, 4):
            for start in range(0, n + 1, 5):
                steps = optimizer_steps(n, start, 2 * world_size, world_size)
                taken = [i for s in steps for i in s]
                assert taken == list(range(start, start + len(taken))) and n - start - len(taken) < world_size
                assert all(len(s) % world_size == 0 for s in steps)  # every rank the same count


def test_a_resume_with_another_global_batch_plans_the_steps_left():
    # 13 batches an epoch, 2 epochs. Written by 2 processes x 1 at step 3 (batch 6 of epoch 0):
    position = {"step": 3, "epoch": 0, "batch": 6, "batches_per_step": 2}
    assert planned_steps(13, position, 2, 2, num_epochs=2) == 2 * 6  # the same global batch: as planned
    assert planned_steps(13, position, 2, 1, num_epochs=2) == 2 * 7  # 1 process x 2: its own plan
    # 1 process x 1: 7 steps to the end of epoch 0 (batches 6..12), then 13
    assert planned_steps(13, position, 1, 1, num_epochs=2) == 3 + 7 + 13
    # 4 processes x 1: epoch 0's last 7 batches make 1 step (3 dropped), then 3 a full epoch
    assert planned_steps(13, position, 4, 4, num_epochs=2) == 3 + 1 + 3
    assert planned_steps(13, {"step": 3, "epoch": 0, "batch": 6}, 2, 2, 2) == 12  # older checkpoints


# --------------------------------------------------------------------------------------------
# distill.py on 2 processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(protbert_teacher_dir, fasta, tmp_path_factory) -> dict[str, Path]:
    """4 steps of 2 global batches each, with checkpoints at steps 2 and 4: by 2 processes x 1 ("two")
    and by 1 process accumulating 2 micro-batches ("one")."""
    root = tmp_path_factory.mktemp("runs")
    # --hidden_weight: the projection of the student's hidden states is trained outside DDP's wrapper
    flags = [
        *shared_flags(protbert_teacher_dir, fasta),
        *TRAINING,
        "--hidden_weight",
        "0.5",
        "--max_steps",
        "4",
        "--save_every",
        "2",
        "--keep_last",
        "0",
    ]
    result = torchrun("distill.py", [*flags, "--output_dir", str(root / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    distill.main([*flags, "--output_dir", str(root / "one"), "--grad_accumulation_steps", "2"])
    return {"two": root / "two", "one": root / "one", "flags": flags, "stdout": result.stdout}


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(runs):
    two, one = runs["two"], runs["one"]
    for step in (2, 4):
        assert_same_weights(two / f"checkpoint-{step}", one / f"checkpoint-{step}")
        projections = [torch.load(run / f"checkpoint-{step}" / TRAINING_STATE)["hidden_proj"] for run in (two, one)]
        torch.testing.assert_close(*projections, atol=1e-5, rtol=1e-5)
    moved = load_student(two / "checkpoint-4").model.state_dict()["embed_tokens.weight"]
    assert (moved - load_student(two / "checkpoint-2").model.state_dict()["embed_tokens.weight"]).abs().max() > 1e-3
    # evaluation: each rank scores half the validation batches; the sums are all-reduced
    val_two, val_one = records(two, "val"), records(one, "val")
    assert [r["step"] for r in val_two] == [r["step"] for r in val_one] == [0, 2, 4]
    for a, b in zip(val_two, val_one):
        assert a["masked_tokens"] == b["masked_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["agreement"] == pytest.approx(b["agreement"])
    # training records: one per step, written once (by rank 0), over both ranks' batches
    train_two, train_one = records(two, "train"), records(one, "train")
    assert [r["step"] for r in train_two] == [1, 2, 3, 4]
    for a, b in zip(train_two, train_one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["masked_acc"] == pytest.approx(b["masked_acc"])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["batches_per_step"] == 2 and summary["steps"] == 4
    assert runs["stdout"].count("done: 4 steps") == 1  # rank 1 prints nothing
    assert load_student(two / "best_model").metadata["step"] == summary["best_step"]


def test_a_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path):
    two, one = runs["two"], runs["one"]
    # written by 2 processes, resumed by 1 accumulating 2 micro-batches: the same steps from batch 4 on
    resumed = tmp_path / "two_then_one"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    distill.main([*runs["flags"], "--output_dir", str(resumed), "--grad_accumulation_steps", "2", "--resume", "auto"])
    assert_same_weights(resumed / "checkpoint-4", two / "checkpoint-4")

    # and the other way round, under torchrun
    resumed = tmp_path / "one_then_two"
    resumed.mkdir()
    shutil.copytree(one / "checkpoint-2", resumed / "checkpoint-2")
    result = torchrun("distill.py", [*runs["flags"], "--output_dir", str(resumed), "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2 (epoch 0, batch 4)" in result.stdout
    assert_same_weights(resumed / "checkpoint-4", one / "checkpoint-4")
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4


def fail_on_rank_1_at_step_2(loss_terms):
    """loss_terms, raising on rank 1's second training micro-batch (evaluation runs without grad)."""
    calls = 0

    def failing(*args, **kwargs):
        nonlocal calls
        if torch.is_grad_enabled() and os.environ["RANK"] == "1":
            calls += 1
            if calls == 2:
                raise RuntimeError("injected failure on rank 1")
        return loss_terms(*args, **kwargs)

    return failing


def test_a_failing_rank_ends_the_job(protbert_teacher_dir, fasta, tmp_path):
    out = tmp_path / "run"
    result = torchrun(
        __file__,
        [
            *shared_flags(protbert_teacher_dir, fasta),
            *TRAINING,
            "--output_dir",
            str(out),
            "--max_steps",
            "100",
            "--save_every",
            "1",
            "--keep_last",
            "0",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr and "rank 1 failed" in result.stderr
    # rank 0 could not finish step 2 without rank 1: step 1's checkpoint is the last, and whole
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert load_student(out / "checkpoint-1").metadata["step"] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on Linux")
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(protbert_teacher_dir, fasta, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = [
        *shared_flags(protbert_teacher_dir, fasta),
        *TRAINING,
        "--output_dir",
        str(out),
        "--max_steps",
        "1000000",
        "--num_epochs",
        "100000",
        "--save_every",
        "5",
        "--keep_last",
        "0",
        "--eval_every",
        "1000000",
    ]
    with open(log, "w") as stderr:
        job = start_torchrun("distill.py", argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 90
        while not (out.is_dir() and list_checkpoints(out)):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", log.read_text())
    assert len(stopped) == 1, log.read_text()[-3000:]  # said by rank 0 alone
    step = int(stopped[0])
    newest = list_checkpoints(out)[-1]
    assert newest.name == f"checkpoint-{step}" and load_student(newest).metadata["step"] == step
    assert torch.load(newest / TRAINING_STATE)["position"]["step"] == step


# --------------------------------------------------------------------------------------------
# The teacher cache
# --------------------------------------------------------------------------------------------


def test_two_processes_fill_the_cache_one_would_and_train_from_it(protbert_teacher_dir, fasta, tmp_path):
    teacher_dir = shutil.copytree(protbert_teacher_dir, tmp_path / "teacher")  # removed to show it is not needed
    cache_flags = ["--mask_variants", "2"]
    two_cache, one_cache = tmp_path / "two_cache", tmp_path / "one_cache"
    result = torchrun(
        "cache_teacher.py", [*shared_flags(teacher_dir, fasta, *cache_flags), "--teacher_cache", str(two_cache)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "34 batches through the teacher" in result.stdout  # 2 variants x 16 train + 2 val batches, each once
    cache_teacher.main(shared_flags(teacher_dir, fasta, *cache_flags, "--teacher_cache", str(one_cache)))
    manifest = json.loads((two_cache / "manifest.json").read_text())
    assert manifest == json.loads((one_cache / "manifest.json").read_text())
    assert sorted(manifest["complete"]) == ["train0", "train1", "val"]
    for part in manifest["complete"]:
        assert np.array_equal(np.load(two_cache / f"{part}.offsets.npy"), np.load(one_cache / f"{part}.offsets.npy"))
        np.testing.assert_allclose(
            np.load(two_cache / f"{part}.logits.npy"), np.load(one_cache / f"{part}.logits.npy"), rtol=1e-3, atol=1e-2
        )

    # each rank reads its own batches' entries: the same weights as one process, and no teacher
    shutil.rmtree(teacher_dir)
    flags = [
        *shared_flags(teacher_dir, fasta, *cache_flags, "--teacher_cache", str(two_cache)),
        *TRAINING,
        "--num_epochs",
        "2",
        "--eval_every",
        "100",
    ]
    result = torchrun("distill.py", [*flags, "--output_dir", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    distill.main([*flags, "--output_dir", str(tmp_path / "one"), "--grad_accumulation_steps", "2"])
    assert_same_weights(tmp_path / "two" / "checkpoint-16", tmp_path / "one" / "checkpoint-16")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["teacher_loaded"] is False


def test_two_processes_refuse_to_fill_a_cache_while_training(protbert_teacher_dir, fasta, tmp_path):
    result = torchrun(
        "distill.py",
        [
            *shared_flags(protbert_teacher_dir, fasta, "--teacher_cache", str(tmp_path / "c")),
            *TRAINING,
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
        ],
    )
    # the first rank to exit (2, a user error) makes torchrun stop the other, which may not get to say it
    assert result.returncode != 0 and re.search(r"exitcode\s*: 2 ", result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(
        "lacks mask variants val, train0, train1, train2, train3" in e and "cache_teacher.py" in e for e in errors
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_bad_timeout_is_refused_before_any_process_group():
    with pytest.raises(cli.UserError, match="--dist_timeout must be positive"):
        validate_shared_args(
            Namespace(
                max_seq_len=32,
                batch_size=4,
                mask_variants=1,
                max_tokens=None,
                num_workers=0,
                mask_prob=0.15,
                fp16=False,
                bf16=False,
                dist_timeout=0,
            )
        )


if __name__ == "__main__":  # torchrun tests/test_distributed.py <distill.py arguments>
    training_step.loss_terms = fail_on_rank_1_at_step_2(training_step.loss_terms)
    cli.run(distill.main)
