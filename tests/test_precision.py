"""The reduced-precision paths on CPU: fp16 autocast with a real GradScaler (forced by
PEPEMB_CPU_FP16=1), bf16 autocast, the bitsandbytes int8 teacher (PEPEMB_CPU_BNB=1), the
refusal of teacher logits that fp16 cannot hold, and --device cuda / mps where there is none."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import architecture
import cache_teacher
import distill
import evaluate
from architecture import load_student
from conftest import tiny_args
from pepemb import training_step
from pepemb.cli import UserError
from pepemb.devices import CPU_FP16
from pepemb.teacher import CPU_BNB, load_teacher

REPO = Path(__file__).resolve().parents[1]


def run_args(teacher_dir, fasta, output_dir, *extra):
    return tiny_args(teacher_dir, fasta, output_dir, "--device", "cpu", "--log_every", "1", *extra)


def summary_of(output_dir):
    return json.loads((output_dir / "summary.json").read_text())


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def scaler_state(checkpoint):
    return torch.load(checkpoint / "training_state.pt", weights_only=True)["scaler"]


# --------------------------------------------------------------------------------------------
# fp16: autocast and a real GradScaler on CPU
# --------------------------------------------------------------------------------------------


def overflow_injector(loss_terms, seen):
    """loss_terms, with the 2nd training micro-batch's loss scaled by 1e8 (finite, but its scaled
    gradients overflow fp16: the GradScaler's own skip) and the 3rd's made infinite (distill.py's
    skip of a non-finite loss). Records the autocast state it runs in, in training."""
    calls = 0

    def injected(out, *args, **kwargs):
        nonlocal calls
        terms = loss_terms(out, *args, **kwargs)
        if torch.is_grad_enabled():  # validation runs without grad
            calls += 1
            seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            if calls == 2:
                terms["loss"] = terms["loss"] * 1e8
            elif calls == 3:
                terms["loss"] = terms["loss"] * float("inf")
        return terms

    return injected


FP16_RUN = ["--fp16", "--num_epochs", "2", "--save_every", "2", "--keep_last", "0", "--eval_every", "100"]


@pytest.fixture(scope="module")
def fp16_run(protbert_teacher_dir, small_fasta, tmp_path_factory):
    """Two epochs (12 batches) under PEPEMB_CPU_FP16=1 with the two injected faults; a checkpoint
    every 2 steps. Returns (output folder, autocast states seen in training, warnings)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(CPU_FP16, "1")
    seen = set()
    monkeypatch.setattr(training_step, "loss_terms", overflow_injector(training_step.loss_terms, seen))
    out = tmp_path_factory.mktemp("fp16") / "run"
    try:
        with pytest.warns(UserWarning, match="non-finite loss") as caught:
            distill.main(run_args(protbert_teacher_dir, small_fasta, out, *FP16_RUN))
    finally:
        monkeypatch.undo()
    return out, seen, [str(w.message) for w in caught]


def test_fp16_on_cpu_backs_the_loss_scale_off_on_both_kinds_of_overflow(fp16_run):
    out, autocast, messages = fp16_run
    assert autocast == {(True, torch.float16)}  # the student's forward and loss ran under fp16 autocast
    summary = summary_of(out)
    assert summary["precision"] == "float16" and summary["steps"] == 11  # 12 batches, one skipped
    assert [m for m in messages if "non-finite" in m] == ["non-finite loss at step 3; step skipped (1 in a row)"]
    # Step 2: the scaled gradients overflowed (in fp16: fp32 holds 1e8 x 2^16 x a gradient);
    # scaler.step skipped the update and update() halved the scale. Batch 3: the loss was
    # infinite and distill.py dropped the step; skip_step halves the scale again.
    scales = {c: scaler_state(out / f"checkpoint-{c}")["scale"] for c in (2, 4, 6, 8, 10, 11)}
    assert scales == {2: 2.0**15, 4: 2.0**14, 6: 2.0**14, 8: 2.0**14, 10: 2.0**14, 11: 2.0**14}
    # The growth tracker counts good steps since the last back-off: steps 3..11.
    state = torch.load(out / "checkpoint-11" / "training_state.pt", weights_only=True)
    assert state["scaler"]["_growth_tracker"] == 9
    assert state["optimizer"]["state"][0]["step"] == 10  # AdamW skipped step 2, the scaler's skip
    train = [r for r in records(out) if r["split"] == "train"]
    # step 3's record holds the skipped batch's infinite loss too; after it all is finite again
    assert [r["step"] for r in train] == list(range(1, 12)) and math.isinf(train[2]["loss"])
    assert all(math.isfinite(r["loss"]) for r in train[3:])
    assert math.isfinite(summary["final_val"]["loss"])


def test_fp16_on_cpu_resumes_exactly(fp16_run, protbert_teacher_dir, small_fasta, tmp_path):
    full, _, _ = fp16_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")  # after both faults
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(CPU_FP16, "1")
        distill.main(run_args(protbert_teacher_dir, small_fasta, resumed, *FP16_RUN, "--resume", "auto"))
    assert scaler_state(resumed / "checkpoint-11") == scaler_state(full / "checkpoint-11")
    a = load_student(full / "checkpoint-11").model.state_dict()
    b = load_student(resumed / "checkpoint-11").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary_of(resumed)["final_val"] == summary_of(full)["final_val"]


# --------------------------------------------------------------------------------------------
# bf16: autocast in training, validation and a later evaluate.py
# --------------------------------------------------------------------------------------------


def test_bf16_on_cpu_trains_validates_and_evaluates(protbert_teacher_dir, small_fasta, tmp_path, monkeypatch):
    forward, seen = architecture.Student.forward, set()

    def recording_forward(self, *args, **kwargs):
        seen.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(architecture.Student, "forward", recording_forward)
    out = tmp_path / "run"
    distill.main(run_args(protbert_teacher_dir, small_fasta, out, "--bf16", "--max_steps", "3", "--eval_every", "2"))
    monkeypatch.undo()
    # training (with grad) and validation (without) both ran under bf16 autocast
    assert seen == {(True, True, torch.bfloat16), (False, True, torch.bfloat16)}
    summary = summary_of(out)
    assert summary["precision"] == "bfloat16" and summary["steps"] == 3
    logged = records(out)
    assert {r["split"] for r in logged} == {"train", "val"}
    assert all(math.isfinite(r["loss"]) for r in logged)
    # evaluate.py (fp32: it has no precision flag) on the bf16-trained checkpoint
    report = evaluate.evaluate_checkpoint(
        out / "checkpoint-3",
        small_fasta,
        tmp_path / "eval",
        max_sequences=24,
        speed_batches=1,
        device="cpu",
        mutation_proteins=2,
        mutation_positions=2,
        embedding_proteins=4,
    )
    metrics = report["metrics"]
    assert math.isfinite(metrics["student"]["cross_entropy"]) and math.isfinite(metrics["kl_teacher_student"])
    assert 0 <= metrics["agreement"] <= 1


# --------------------------------------------------------------------------------------------
# The bitsandbytes int8 teacher, on CPU
# --------------------------------------------------------------------------------------------


def test_bitsandbytes_teacher_on_cpu_agrees_with_fp32(protbert_teacher_dir, antibody_proteins, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(CPU_BNB, "1")
    int8 = load_teacher(str(protbert_teacher_dir), device="cpu", use_8bit=True)
    monkeypatch.delenv(CPU_BNB)
    fp32 = load_teacher(str(protbert_teacher_dir), device="cpu")
    assert int8.backend == "int8 bitsandbytes (CPU)" and int8.num_parameters == fp32.num_parameters
    layers = [m for m in int8.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 13 and all(m.weight.dtype == torch.int8 for m in layers)  # 2 x 6 + the head's

    input_ids, attention_mask = fp32.tokenizer.batch_encode([p.sequence for p in antibody_proteins[:32]])
    got, want = int8(input_ids, attention_mask)["logits"], fp32(input_ids, attention_mask)["logits"]
    real = attention_mask.bool()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    agreement = (got.argmax(-1) == want.argmax(-1))[real].float().mean()
    assert agreement >= 0.93  # measured 0.968 (torch's dynamic int8 on CPU: 0.919)
    assert (got - want)[real].abs().max() < 0.1 * want[real].abs().max()  # measured 0.16 of 4.55


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing_teacher_dir(protbert_teacher_dir, tmp_path_factory):
    """The tiny teacher with the output bias of one token at 1e5: finite logits that fp16
    (largest 65504) cannot hold."""
    from transformers import AutoModelForMaskedLM

    directory = shutil.copytree(protbert_teacher_dir, tmp_path_factory.mktemp("overflow") / "teacher")
    model = AutoModelForMaskedLM.from_pretrained(directory)
    with torch.no_grad():
        model.cls.predictions.bias[5] = 1e5
    model.save_pretrained(directory)
    return directory


def test_a_cache_of_logits_that_overflow_fp16_is_refused(overflowing_teacher_dir, small_fasta, tmp_path):
    argv = ["--data_path", str(small_fasta), "--teacher_model", str(overflowing_teacher_dir)]
    argv += ["--teacher_cache", str(tmp_path / "cache"), "--max_seq_len", "64", "--device", "cpu"]
    with pytest.raises(UserError, match=r"logits are not finite in fp16 \(largest magnitude 1e\+05\)"):
        cache_teacher.main(argv)


def script_error(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(protbert_teacher_dir, small_fasta, tmp_path):
    argv = run_args(protbert_teacher_dir, small_fasta, tmp_path / "run")
    result = script_error("distill.py", *argv, "--device", "cuda")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --device cuda asked for, but torch sees no CUDA GPU"]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_device_mps_without_mps_is_one_line_and_exit_2(small_fasta, tmp_path):
    argv = ["--model_path", str(tmp_path / "model.pt"), "--data_path", str(small_fasta)]
    result = script_error("evaluate.py", *argv, "--output_dir", str(tmp_path / "eval"), "--device", "mps")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --device mps asked for, but MPS is not available"]
