"""distill.py end to end on CPU with a tiny ProtBert-vocabulary teacher."""

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import distill
from architecture import load_student
from conftest import tiny_args
from pepemb.checkpoints import list_checkpoints
from pepemb.cli import UserError
from pepemb.devices import CPU_FP16
from pepemb.schedule import budget_schedule


def read_metrics(output_dir):
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def test_short_run_moves_student_towards_teacher(protbert_teacher_dir, small_fasta, tmp_path):
    out = tmp_path / "run"
    distill.main(
        tiny_args(
            protbert_teacher_dir,
            small_fasta,
            out,
            "--num_epochs",
            "8",
            "--eval_every",
            "20",
            "--distill_weight",
            "0.9",
            "--task_weight",
            "0.1",
            "--dropout",
            "0.0",
        )
    )
    val = [r for r in read_metrics(out) if r["split"] == "val"]
    # 96 train sequences / 16 = 6 steps x 8 epochs; validation at step 0, every 20 steps and at the
    # end, not at every epoch's end
    assert [r["step"] for r in val] == [0, 20, 40, 48]
    assert val[-1]["kl"] < 0.5 * val[0]["kl"], (val[0]["kl"], val[-1]["kl"])
    assert val[-1]["agreement"] > val[0]["agreement"] + 0.2
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert all(r["tokens_per_s"] > 0 for r in train)
    lrs = [r["lr"] for r in train]  # warmup to 3e-3 over 2 steps, then linear decay to 0 at step 48
    assert max(lrs) == pytest.approx(3e-3 * 46 / 46, rel=0.05) and lrs[-1] == 0.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 48 and summary["teacher_backend"] == "fp32"
    assert (out / "training_curves.png").stat().st_size > 10_000
    best = load_student(out / "best_model" / "model.pt")
    assert best.metadata["step"] == summary["best_step"]
    assert best.metadata["val"]["loss"] == min(r["loss"] for r in val)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-48"]


def test_resume_reaches_the_same_weights(protbert_teacher_dir, small_fasta, tmp_path):
    # dropout on, accumulation over 2 micro-batches, checkpoint mid-epoch: every RNG and the data
    # position must be restored for the resumed run to match the uninterrupted one bit for bit.
    flags = [
        "--num_epochs",
        "3",
        "--save_every",
        "4",
        "--keep_last",
        "0",
        "--eval_every",
        "100",
        "--dropout",
        "0.1",
        "--grad_accumulation_steps",
        "2",
        "--max_tokens",
        "512",
    ]
    full = tmp_path / "full"
    distill.main(tiny_args(protbert_teacher_dir, small_fasta, full, *flags))
    steps = [p.name for p in list_checkpoints(full)]
    last = steps[-1]
    assert "checkpoint-4" in steps and last != "checkpoint-4"

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    distill.main(tiny_args(protbert_teacher_dir, small_fasta, resumed, *flags, "--resume", "auto"))
    a = load_student(full / last).model.state_dict()
    b = load_student(resumed / last).model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_existing_run_is_refused_without_resume_or_overwrite(protbert_teacher_dir, small_fasta, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds a training run"):
        distill.main(tiny_args(protbert_teacher_dir, small_fasta, out, "--max_steps", "1"))


class Crashed(BaseException):
    """Stands for a kill in the middle of a write: nothing after it runs."""


class HalfWrite:
    """A file whose first write puts 10 bytes on disk and then crashes."""

    def __init__(self, file, written: list):
        self.file, self.written = file, written

    def write(self, text):
        self.file.write(text[:10])
        self.file.flush()
        self.written.append(text[:10])
        raise Crashed

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.skipif(sys.platform != "linux", reason="names open file descriptors through /proc")
def test_a_crash_while_summary_json_is_written_keeps_the_earlier_one(
    protbert_teacher_dir, small_fasta, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    distill.main(tiny_args(protbert_teacher_dir, small_fasta, out, "--max_steps", "2", "--eval_every", "100"))
    earlier = (out / "summary.json").read_bytes()
    assert json.loads(earlier)["steps"] == 2

    # Resumed to step 4, then killed half-way through the write of its summary.json: whatever
    # file the summary is written to (summary.json itself, or a temporary file beside it).
    real_open, written = io.open, []

    def open_crashing_summary_writes(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if "summary.json" in Path(name).name and any(c in mode for c in "wax+"):
            return HalfWrite(handle, written)
        return handle

    monkeypatch.setattr(io, "open", open_crashing_summary_writes)
    with pytest.raises(Crashed):
        distill.main(
            tiny_args(
                protbert_teacher_dir, small_fasta, out, "--max_steps", "4", "--eval_every", "100", "--resume", "auto"
            )
        )
    monkeypatch.undo()
    assert len(written) == 1 and (out / "checkpoint-4").is_dir()  # it did crash in the summary's write
    assert (out / "summary.json").read_bytes() == earlier  # the earlier summary, whole
    assert sorted(p.name for p in out.iterdir() if "summary" in p.name) == ["summary.json"]  # no leftovers


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_heads", "5"], "does not divide"),
        (["--temperature", "0"], "temperature"),
        (["--distill_weight", "0", "--task_weight", "0"], "loss weights are 0"),
        (["--batch_size", "-1"], "batch_size"),
        (["--fp16", "--bf16"], "one of --fp16"),
    ],
)
def test_bad_flag_combinations_fail_before_any_model_loads(tmp_path, flags, message):
    # the teacher path does not exist: the flag error must be reported first
    with pytest.raises(UserError, match=message):
        distill.main(
            [
                "--data_path",
                "x.fasta",
                "--teacher_model",
                str(tmp_path / "missing"),
                "--output_dir",
                str(tmp_path / "out"),
                *flags,
            ]
        )
    assert not (tmp_path / "out").exists()


def test_fp16_on_cpu_warns_and_runs_fp32(protbert_teacher_dir, small_fasta, tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_FP16, raising=False)  # the testing switch to fp16 on CPU is off
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="--fp16 needs a CUDA GPU; training in fp32 on cpu"):
        distill.main(tiny_args(protbert_teacher_dir, small_fasta, out, "--fp16", "--device", "cpu", "--max_steps", "2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "float32" and summary["args"]["fp16"] is True
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["scaler"] == {}  # the GradScaler was disabled


def test_int8_teacher_and_wandb_offline(protbert_teacher_dir, small_fasta, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    distill.main(
        tiny_args(
            protbert_teacher_dir,
            small_fasta,
            out,
            "--max_steps",
            "4",
            "--use_8bit",
            "--use_wandb",
            "--wandb_run_name",
            "pytest",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert "int8" in summary["teacher_backend"]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_budget_schedule_warms_up_by_steps_then_decays_with_the_budget():
    used = {"fraction": 0.0}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = budget_schedule(optimizer, warmup_steps=4, kind="linear", budget_fraction=lambda step: used["fraction"])
    lrs = []
    for fraction in (0.0, 0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 1.5):
        used["fraction"] = fraction
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 0.9, 0.75, 0.5, 0.0, 0.0])
    cosine = budget_schedule(optimizer, warmup_steps=0, kind="cosine", budget_fraction=lambda step: 0.5)
    assert cosine.get_last_lr()[0] == pytest.approx(0.5)


def test_max_time_stops_on_the_budget_with_a_final_evaluation_and_checkpoint(
    protbert_teacher_dir, small_fasta, tmp_path
):
    out = tmp_path / "run"
    distill.main(
        tiny_args(
            protbert_teacher_dir,
            small_fasta,
            out,
            "--max_time",
            "0.1",
            "--num_epochs",
            "10000",
            "--eval_every",
            "100000",
            "--save_every",
            "100000",
            "--log_every",
            "1",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train"]
    budget_s, total_steps = 6.0, 6 * 10000  # 0.1 min; 96 training sequences / 16 a step x 10,000 epochs
    # Every step is logged with the clock the budget is checked on (the elapsed_s of its step):
    # the run stops after the first step on the budget, never before it and never a step later,
    # however fast or slow the machine.
    assert [r["step"] for r in train] == list(range(1, summary["steps"] + 1))
    assert summary["steps"] < total_steps
    assert all(r["elapsed_s"] < budget_s for r in train[:-1]) and train[-1]["elapsed_s"] >= budget_s
    assert summary["elapsed_s"] >= train[-1]["elapsed_s"]
    # The learning rate decays with the share of the budget used at each step, not with a step
    # count: half of 3e-3 after the first of 2 warmup steps, then 3e-3 x (1 - elapsed_s / budget)
    # from step 2, exactly 0 at the last step.
    assert train[0]["lr"] == pytest.approx(1.5e-3)
    for r in train[1:]:
        used = min(max(r["elapsed_s"] / budget_s, r["step"] / total_steps), 1.0)
        assert r["lr"] == pytest.approx(3e-3 * (1 - used), rel=1e-9, abs=1e-15), r
    assert train[-1]["lr"] == 0.0
    assert records[-1]["split"] == "val" and records[-1]["step"] == summary["steps"]
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{summary['steps']}"]


def test_max_time_with_max_steps_decays_to_zero_at_the_last_step(protbert_teacher_dir, small_fasta, tmp_path):
    out = tmp_path / "run"  # an hour's budget that 8 steps never use up: the steps end the run, and the decay
    distill.main(
        tiny_args(
            protbert_teacher_dir,
            small_fasta,
            out,
            "--max_time",
            "60",
            "--max_steps",
            "8",
            "--num_epochs",
            "10000",
            "--eval_every",
            "100000",
        )
    )
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if r["split"] == "train"}
    assert sorted(lrs) == [2, 4, 6, 8]
    # warmup 2 steps, then 3e-3 x (1 - step / 8); the seconds used of 3,600 move it by under 1%
    assert [lrs[s] for s in (4, 6)] == pytest.approx([1.5e-3, 0.75e-3], rel=0.01)
    assert lrs[8] == 0.0


def test_masked_lm_only_never_calls_the_teacher_in_training(protbert_teacher_dir, small_fasta, tmp_path):
    out = tmp_path / "run"
    distill.main(
        tiny_args(
            protbert_teacher_dir, small_fasta, out, "--max_steps", "6", "--distill_weight", "0", "--task_weight", "1"
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_batches"] == {"live": 1, "cached": 0}  # the one validation batch, once
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert all(r["agreement"] is None and r["kl"] == 0 for r in train)
    assert summary["final_val"]["agreement"] > 0  # evaluation still compares with the teacher


@pytest.mark.slow  # two compilations of the student
def test_compiled_training_checkpoints_resumes_and_trains_as_eager(protbert_teacher_dir, small_fasta, tmp_path):
    # no dropout: inductor draws its dropout masks from its own generator, so eager and compiled
    # runs would differ by their masks and not only by rounding
    flags = ["--num_epochs", "1", "--max_steps", "6", "--save_every", "3", "--keep_last", "0", "--eval_every", "100"]
    flags += ["--dropout", "0"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = tmp_path / name
        distill.main(tiny_args(protbert_teacher_dir, small_fasta, runs[name], *flags, *extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["compiled"] / "checkpoint-3", resumed / "checkpoint-3")
    distill.main(tiny_args(protbert_teacher_dir, small_fasta, resumed, *flags, "--compile", "--resume", "auto"))
    final = {name: load_student(path / "checkpoint-6").model.state_dict() for name, path in runs.items()}
    final["resumed"] = load_student(resumed / "checkpoint-6").model.state_dict()
    assert final["eager"].keys() == final["compiled"].keys() == final["resumed"].keys()  # no _orig_mod. prefix
    for name, weight in final["compiled"].items():
        # compiled kernels round differently from eager ones; a resumed compiled run matches its twin
        assert torch.allclose(weight, final["eager"][name], atol=1e-4), name
        assert torch.allclose(weight, final["resumed"][name], atol=1e-6), name
    assert not torch.equal(
        final["compiled"]["embed_tokens.weight"],
        load_student(runs["compiled"] / "checkpoint-3").model.state_dict()["embed_tokens.weight"],
    )
