"""bench/gpu_check.py: the refusal without CUDA, the arguments, each check's pass/fail logic on
hand-made numbers, the orchestration and report on stand-in measurements, and (slow) one real
run of every check on the CPU with --allow_cpu at tiny sizes."""

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
import gpu_check_runs  # noqa: E402
from pepemb import data  # noqa: E402

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
CHECKS = [
    "fp32",
    "fp16",
    "bf16",
    "teacher_8bit",
    "torchrun_1",
    "resume_plain",
    "resume_torchrun_2_nccl",
    "speed",
]


def a_run(**changes) -> dict:
    """The numbers of a distill.py run that went well (gpu_check_runs.read_run's keys)."""
    run = {
        "returncode": 0,
        "timed_out": False,
        "log": "run.log",
        "steps": 400,
        "processes": 1,
        "precision": "float32",
        "val_masked_acc": 0.45,
        "val_loss": 2.5,
        "train_records": 40,
        "nonfinite_train_losses": 0,
        "skipped_steps": 0,
        "scaler": {},
        "resumed_at_step": None,
    }
    return {**run, **changes}


def fp32_reference(acc: float = 0.45) -> dict:
    return gpu_check.judge_reference(a_run(val_masked_acc=acc), 400, 0.3)


# --------------------------------------------------------------------------------------------
# Refusal and arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_check.sh"])
def test_without_cuda_it_refuses_in_one_line_with_exit_2(script, tmp_path):
    output = tmp_path / "report.json"
    launch = [sys.executable] if script.endswith(".py") else ["bash"]
    result = subprocess.run(
        [*launch, str(REPO / "bench" / script), "--output", str(output)],
        cwd=tmp_path,  # the wrapper and the script find the repository themselves
        env={**NO_GPU, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs a CUDA GPU" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not output.exists()


def test_arguments_defaults_and_refusals(capsys):
    args = gpu_check.parse_args([])
    assert Path(args.output) == REPO / "outputs" / "gpu_check.json"
    assert (args.steps, args.quick, args.allow_cpu, args.time_limit_s) == (None, False, False, 420.0)
    assert Path(args.fasta) == data.SHIPPED_ANTIBODIES
    args = gpu_check.parse_args(["--steps", "50", "--quick", "--time_limit_s", "90", "--output", "x.json"])
    assert (args.steps, args.quick, args.time_limit_s, args.output) == (50, True, 90.0, "x.json")
    for bad in (["--steps", "0"], ["--steps", "-3"], ["--steps", "many"], ["--time_limit_s", "0"], ["--nope"]):
        with pytest.raises(SystemExit) as stopped:
            gpu_check.parse_args(bad)
        assert stopped.value.code == 2, bad
    assert "must be positive" in capsys.readouterr().err


def test_settings_of_a_gpu_run_a_quick_one_and_the_cpu_test_run():
    full = gpu_check.settings_for(gpu_check.parse_args([]), cuda=True, gpus=2)
    assert (full.device, full.gpus, full.steps, full.student, full.batch_size) == ("cuda", 2, 400, (), 32)
    assert [s["d_model"] for s in full.speed_sizes] == [128, 384, 768] and full.agreement_chains == 1000
    assert full.min_reference_acc == gpu_check.MIN_REFERENCE_ACC and full.resume_steps % 2 == 0
    quick = gpu_check.settings_for(gpu_check.parse_args(["--quick"]), cuda=True, gpus=1)
    assert quick.steps == 200 and [s["d_model"] for s in quick.speed_sizes] == [384]
    assert gpu_check.settings_for(gpu_check.parse_args(["--quick", "--steps", "600"]), True, 1).steps == 600
    short = gpu_check.settings_for(gpu_check.parse_args(["--steps", "50"]), cuda=True, gpus=1)
    assert (short.steps, short.min_reference_acc) == (50, 0.0)  # too few steps to demand learning
    cpu = gpu_check.settings_for(gpu_check.parse_args(["--allow_cpu"]), cuda=False, gpus=0)
    assert (cpu.device, cpu.student, cpu.min_reference_acc) == ("cpu", gpu_check.TINY_STUDENT, 0.0)


def test_the_user_facing_readme_does_not_offer_the_test_only_flag():
    readme = (REPO / "README.md").read_text()
    assert "bash bench/gpu_check.sh" in readme and "--allow_cpu" not in readme
    assert "gpu_check.py" in (REPO / "bench" / "README.md").read_text()


# --------------------------------------------------------------------------------------------
# Each check's logic on hand-made numbers
# --------------------------------------------------------------------------------------------


def test_a_distill_run_fails_on_an_exit_code_missing_steps_nonfinite_losses_or_skipped_steps():
    assert gpu_check.run_failures(a_run(), 400) == []
    [failure] = gpu_check.run_failures(a_run(returncode=1, error="error: boom"), 400)
    assert "exited with 1" in failure and "error: boom" in failure and "run.log" in failure
    assert gpu_check.run_failures(a_run(steps=120), 400) == ["stopped at step 120 of 400"]
    assert gpu_check.run_failures(a_run(nonfinite_train_losses=2), 400) == ["2 of 40 logged train losses not finite"]
    assert gpu_check.run_failures(a_run(skipped_steps=1), 400) == ["1 steps skipped for a non-finite loss"]
    assert gpu_check.run_failures(a_run(val_loss=math.nan), 400) == ["final val loss nan"]


def test_the_fp32_reference_must_have_learned():
    assert fp32_reference(0.45)["passed"]
    failed = fp32_reference(0.12)
    assert not failed["passed"] and "val masked acc 0.120 < 0.3" in failed["failures"][0]
    assert not gpu_check.judge_reference(a_run(precision="float16"), 400, 0.3)["passed"]


@pytest.mark.parametrize(
    "acc, passed", [(0.40, False), (0.50, False), (0.42, True), (0.48, True), (0.44, True), (0.45, True)]
)
def test_fp16_and_bf16_accuracy_must_be_within_the_tolerance_of_fp32(acc, passed):
    for precision, dtype, scaler in (("fp16", "float16", {"scale": 32768.0}), ("bf16", "bfloat16", {})):
        run = a_run(precision=dtype, val_masked_acc=acc, scaler=scaler)
        result = gpu_check.judge_precision(precision, run, fp32_reference(0.45), 400, 0.03)
        assert result["passed"] is passed, (precision, acc, result["failures"])
        assert result["delta"] == pytest.approx(acc - 0.45)
        if not passed:
            assert result["failures"] == [f"val masked acc {acc:.3f} vs fp32 0.450: |Δ| {abs(acc - 0.45):.3f} > 0.03"]


@pytest.mark.parametrize(
    "scale, problem",
    [
        (65536.0, None),
        (2.0, None),
        (1.0, None),
        (0.5, "GradScaler scale 0.5 collapsed below 1"),
        (math.inf, "GradScaler scale inf is not a positive finite number"),
        (math.nan, "GradScaler scale nan is not a positive finite number"),
        (0.0, "GradScaler scale 0.0 is not a positive finite number"),
        (None, "no GradScaler scale in the final checkpoint's training_state.pt"),
    ],
)
def test_the_fp16_grad_scaler_scale_must_be_positive_finite_and_not_collapsed(scale, problem):
    scaler = {} if scale is None else {"scale": scale, "growth_factor": 2.0}
    run = a_run(precision="float16", scaler=scaler)
    result = gpu_check.judge_precision("fp16", run, fp32_reference(), 400, 0.03)
    assert result["failures"] == ([] if problem is None else [problem])
    assert result["scale"] is scale


def test_a_precision_run_fails_without_a_reference_in_the_wrong_dtype_or_when_it_crashed():
    run = a_run(precision="bfloat16")
    assert gpu_check.judge_precision("bf16", run, fp32_reference(), 400, 0.03)["passed"]
    assert gpu_check.judge_precision("bf16", run, None, 400, 0.03)["failures"] == [
        "no passing fp32 reference to compare with"
    ]
    assert not gpu_check.judge_precision("bf16", run, fp32_reference(0.1), 400, 0.03)["passed"]
    fell_back = gpu_check.judge_precision("bf16", a_run(), fp32_reference(), 400, 0.03)
    assert fell_back["failures"] == ["ran in float32, not bfloat16"]
    crashed = gpu_check.judge_precision("fp16", a_run(returncode=1, error="CUDA error"), fp32_reference(), 400, 0.03)
    assert len(crashed["failures"]) == 1 and "CUDA error" in crashed["failures"][0]


def agreement(value: float, positions: int = 18000, backend: str = "int8 bitsandbytes (CUDA)") -> dict:
    return {"backend": backend, "masked_positions": positions, "agreement": value, "chains": 1000}


def test_the_8bit_teacher_must_agree_with_fp32_on_97_percent_of_masked_positions():
    assert gpu_check.judge_agreement(agreement(0.995), cuda=True)["passed"]
    assert gpu_check.judge_agreement(agreement(0.97), cuda=True)["passed"]
    low = gpu_check.judge_agreement(agreement(0.96), cuda=True)
    assert low["failures"] == ["top-1 agreement 0.9600 < 0.97 over 18000 masked positions"]
    assert gpu_check.judge_agreement(agreement(0.99, positions=0), cuda=True)["failures"] == [
        "no masked positions to compare"
    ]
    torch_int8 = agreement(0.99, backend="int8 dynamic (torch, CPU)")
    assert gpu_check.judge_agreement(torch_int8, cuda=False)["passed"]
    assert "not bitsandbytes" in gpu_check.judge_agreement(torch_int8, cuda=True)["failures"][0]


def test_the_torchrun_run_must_finish_as_one_process_with_its_halfway_checkpoint(tmp_path):
    (tmp_path / "checkpoint-20").mkdir()
    run = a_run(steps=40, halfway_checkpoint=str(tmp_path / "checkpoint-20"))
    assert gpu_check.judge_torchrun(run, 40)["passed"]
    assert gpu_check.judge_torchrun({**run, "processes": 2}, 40)["failures"] == ["2 processes, expected 1"]
    gone = {**run, "halfway_checkpoint": str(tmp_path / "checkpoint-10")}
    assert "no checkpoint" in gpu_check.judge_torchrun(gone, 40)["failures"][0]


def test_a_resume_must_start_at_the_halfway_step_on_the_right_count_and_end_where_the_uninterrupted_run_did():
    first = a_run(steps=40, val_loss=2.5)
    resumed = a_run(steps=40, val_loss=2.5004, resumed_at_step=20, processes=2)
    result = gpu_check.judge_resume("resume_torchrun_2_nccl", resumed, first, 40, 2)
    assert result["passed"] and result["delta"] == pytest.approx(0.0004)
    assert gpu_check.judge_resume("r", {**resumed, "resumed_at_step": 0}, first, 40, 2)["failures"] == [
        "expected a resume at step 20; at 0"
    ]
    assert gpu_check.judge_resume("r", {**resumed, "resumed_at_step": None}, first, 40, 2)["failures"] == [
        "expected a resume at step 20; it did not say 'resumed from'"
    ]
    assert gpu_check.judge_resume("r", resumed, first, 40, 1)["failures"] == ["2 processes, expected 1"]
    assert gpu_check.judge_resume("r", {**resumed, "steps": 30}, first, 40, 2)["failures"] == [
        "stopped at step 30 of 40"
    ]
    drifted = gpu_check.judge_resume("r", {**resumed, "val_loss": 2.52}, first, 40, 2)
    assert drifted["failures"] == ["final val loss 2.52000 vs 2.50000 uninterrupted: |Δ| 0.02 > 0.01"]
    assert gpu_check.judge_resume("r", resumed, {}, 40, 2)["failures"] == ["no uninterrupted run to compare with"]


def speed(live_tokens: float = 9000.0, cached_tokens: float = 40000.0, peak=(900.0, 300.0), loaded=False) -> dict:
    mode = {"step_ms": 10.0, "timed_steps": 20}
    size = {
        "student": {"d_model": 384, "num_heads": 6, "num_layers": 4},
        "live fp32": {**mode, "tokens_per_s": live_tokens, "peak_memory_mb": peak[0], "teacher_loaded": True},
        "cached": {**mode, "tokens_per_s": cached_tokens, "peak_memory_mb": peak[1], "teacher_loaded": loaded},
    }
    return {"sizes": [size], "cache_fill": {}, "batching": {}}


def test_the_speed_check_needs_every_number_measured_and_the_cached_run_without_teacher():
    assert gpu_check.judge_speed(speed(), cuda=True)["passed"]
    assert "live 9000 / cached 40000 tokens/s (900 / 300 MB peak)" in gpu_check.judge_speed(speed(), True)["summary"]
    assert gpu_check.judge_speed(speed(peak=(None, None)), cuda=False)["passed"]
    assert gpu_check.judge_speed(speed(peak=(None, 300.0)), cuda=True)["failures"] == [
        "d_model 384 live fp32: peak memory None"
    ]
    assert gpu_check.judge_speed(speed(cached_tokens=math.nan), True)["failures"] == [
        "d_model 384 cached: tokens/s nan"
    ]
    assert gpu_check.judge_speed(speed(live_tokens=0.0), True)["failures"] == ["d_model 384 live fp32: tokens/s 0.0"]
    assert gpu_check.judge_speed(speed(loaded=True), True)["failures"] == [
        "d_model 384: the cached run loaded the teacher"
    ]


def test_top1_agreement_and_the_commands_of_the_runs():
    import torch

    assert gpu_check_runs.top1_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 5])) == 0.75
    with pytest.raises(ValueError):
        gpu_check_runs.top1_agreement(torch.tensor([1]), torch.tensor([1, 2]))
    assert gpu_check_runs.launcher(None)[1:] == [str(REPO / "distill.py")]
    assert gpu_check_runs.launcher(2)[1:] == [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(REPO / "distill.py"),
    ]
    settings = gpu_check.settings_for(gpu_check.parse_args([]), cuda=True, gpus=1)
    command = gpu_check_runs.distill_command(settings, Path("/x"), "--fp16", processes=1)
    assert command[command.index("--teacher_model") + 1] == "antiberty" and command[-1] == "--fp16"
    assert command[command.index("--device") + 1] == "cuda" and "--d_model" not in command  # the default student


# --------------------------------------------------------------------------------------------
# The report and the orchestration, on stand-in measurements
# --------------------------------------------------------------------------------------------


def options(**changes) -> Namespace:
    return Namespace(**{**vars(gpu_check.parse_args(["--allow_cpu"])), **changes})


def test_the_report_passes_with_skips_and_fails_on_a_failure_or_a_time_limit():
    settings = gpu_check.settings_for(options(), cuda=False, gpus=0)
    results = {"fp32": fp32_reference(), "fp16": gpu_check.skipped("fp16", "no CUDA")}
    report = gpu_check.assemble_report(results, settings, options(), {"gpus": []}, 1.0)
    assert report["passed"] and report["exit_code"] == 0 and report["failed"] == []
    assert report["counts"] == {"passed": 1, "failed": 0, "skipped": 1}
    results["fp32"] = fp32_reference(0.1)
    report = gpu_check.assemble_report(results, settings, options(), {"gpus": []}, 1.0)
    assert not report["passed"] and report["exit_code"] == 1
    assert report["failed"] == ["FAILED fp32: val masked acc 0.100 < 0.3: the fp32 reference did not learn"]
    results = {"fp32": fp32_reference(), "speed": gpu_check.skipped("speed", "time limit")}
    report = gpu_check.assemble_report(results, settings, options(time_limit_s=60.0), {"gpus": []}, 61.0)
    assert report["exit_code"] == 1 and report["failed"] == [
        "FAILED time limit: speed not started within --time_limit_s 60"
    ]


def test_the_json_is_strict_with_infinite_numbers_as_strings(tmp_path):
    path = tmp_path / "deep" / "report.json"
    gpu_check.write_report({"scale": math.inf, "nested": [{"x": math.nan}, 1.5]}, path)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"scale": "inf", "nested": [{"x": "nan"}, 1.5]}


@pytest.fixture
def stand_ins(monkeypatch):
    """gpu_check_runs' measurements replaced by numbers that pass (each test may change them)."""
    numbers = {
        "precision": lambda precision, settings, workdir: a_run(steps=settings.steps),
        "torchrun": lambda settings, workdir: a_run(steps=settings.resume_steps, halfway_checkpoint=str(workdir)),
        "resume": lambda settings, workdir, first, processes: a_run(
            steps=settings.resume_steps, resumed_at_step=settings.resume_steps // 2
        ),
        "agreement": lambda settings, device: agreement(0.99, backend="int8 dynamic (torch, CPU)"),
        "speed": lambda settings, device, workdir: speed(peak=(None, None)),
    }
    monkeypatch.setattr(gpu_check_runs, "precision_run", lambda *a: numbers["precision"](*a))
    monkeypatch.setattr(gpu_check_runs, "torchrun_run", lambda *a: numbers["torchrun"](*a))
    monkeypatch.setattr(gpu_check_runs, "resume_run", lambda *a: numbers["resume"](*a))
    monkeypatch.setattr(gpu_check_runs, "teacher_agreement", lambda *a: numbers["agreement"](*a))
    monkeypatch.setattr(gpu_check_runs, "speed_runs", lambda *a: numbers["speed"](*a))
    return numbers


def test_main_writes_every_check_to_the_report_and_exits_0(stand_ins, tmp_path, capsys):
    output = tmp_path / "report.json"
    assert gpu_check.main(["--allow_cpu", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert list(report["checks"]) == CHECKS and report["passed"] and report["exit_code"] == 0
    assert {k: v["skipped"] for k, v in report["checks"].items() if v["passed"] is None} == {
        "fp16": "no CUDA",
        "bf16": "no CUDA",
        "resume_torchrun_2_nccl": "no CUDA",
    }
    assert all("seconds" in v for v in report["checks"].values() if v["passed"])
    assert (tmp_path / "report_runs").is_dir()
    printed = capsys.readouterr().out
    assert "PASSED fp32: " in printed and "skipped fp16: no CUDA" in printed and "gpu_check passed: 5 passed" in printed


def test_main_names_the_failed_check_and_its_numbers_and_exits_1(stand_ins, tmp_path, capsys):
    stand_ins["agreement"] = lambda settings, device: agreement(0.90, positions=99, backend="int8 dynamic (torch, CPU)")

    def broken(settings, workdir):
        raise RuntimeError("NCCL error: unhandled system error")

    stand_ins["torchrun"] = broken
    output = tmp_path / "report.json"
    assert gpu_check.main(["--allow_cpu", "--output", str(output)]) == 1
    report = json.loads(output.read_text())
    assert report["failed"] == [
        "FAILED teacher_8bit: top-1 agreement 0.9000 < 0.97 over 99 masked positions",
        "FAILED torchrun_1: raised RuntimeError: NCCL error: unhandled system error",
        "FAILED resume_plain: no uninterrupted run to compare with",  # it resumes torchrun_1's checkpoint
    ]
    assert "Traceback" in report["checks"]["torchrun_1"]["traceback"]
    assert report["checks"]["speed"]["passed"]  # the checks after a failure still run
    printed = capsys.readouterr().out
    assert "FAILED teacher_8bit: top-1 agreement 0.9000 < 0.97" in printed and "gpu_check FAILED: " in printed


def test_past_the_time_limit_no_new_check_starts_and_the_run_fails(stand_ins, tmp_path, capsys):
    output = tmp_path / "report.json"
    assert gpu_check.main(["--allow_cpu", "--output", str(output), "--time_limit_s", "1e-9"]) == 1
    report = json.loads(output.read_text())
    assert report["checks"]["fp32"]["passed"]  # the first check always starts
    assert [k for k, v in report["checks"].items() if v.get("skipped") == "time limit"] == [
        "teacher_8bit",
        "torchrun_1",
        "resume_plain",
        "speed",
    ]
    assert report["failed"][-1].startswith("FAILED time limit: teacher_8bit, torchrun_1, resume_plain, speed")
    assert "FAILED time limit" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# One real run on the CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_check_runs_for_real_on_the_cpu_with_allow_cpu(tmp_path):
    fasta = tmp_path / "antibodies.fasta"
    data.write_fasta(fasta, data.read_fasta(data.SHIPPED_ANTIBODIES)[:100])
    output = tmp_path / "out" / "gpu_check.json"
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--allow_cpu", "--fasta", str(fasta), "--output", str(output)],
        env={**NO_GPU, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["passed"] and list(report["checks"]) == CHECKS
    assert report["device"]["gpus"] == [] and report["settings"]["device"] == "cpu"
    checks = report["checks"]
    fp32 = checks["fp32"]["run"]
    assert fp32["steps"] == 4 and fp32["precision"] == "float32" and 0 <= fp32["val_masked_acc"] <= 1
    assert fp32["scaler"] == {} and fp32["nonfinite_train_losses"] == 0
    assert (
        checks["teacher_8bit"]["backend"] == "int8 dynamic (torch, CPU)" and checks["teacher_8bit"]["agreement"] >= 0.97
    )
    assert checks["torchrun_1"]["run"]["command"].count("torch.distributed.run --standalone --nproc_per_node 1") == 1
    resumed = checks["resume_plain"]
    assert resumed["run"]["resumed_at_step"] == 2 and resumed["run"]["steps"] == 4 and resumed["delta"] == 0
    assert [s["student"]["d_model"] for s in checks["speed"]["sizes"]] == [32, 64]
    assert all(s[m]["tokens_per_s"] > 0 for s in checks["speed"]["sizes"] for m in ("live fp32", "cached"))
    assert not any(s["cached"]["teacher_loaded"] for s in checks["speed"]["sizes"])
    lines = result.stdout.splitlines()
    assert sum(line.split("] ", 1)[-1].startswith(("PASSED", "skipped")) for line in lines) == len(CHECKS)
    assert "skipped fp16: no CUDA" in result.stdout and lines[-1].startswith("gpu_check passed: 5 passed, 0 failed")


def test_a_run_past_its_time_is_killed_with_its_session_and_the_time_left_bounds_every_run(tmp_path):
    import time
    from dataclasses import replace

    sleeper = [
        sys.executable,
        "-c",
        "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
    ]
    result = gpu_check_runs.run_logged(sleeper, tmp_path / "sleep.log", timeout_s=2)
    assert result["timed_out"] and result["returncode"] == -9 and result["seconds"] < 30
    settings = gpu_check.settings_for(gpu_check.parse_args([]), cuda=True, gpus=1)
    assert gpu_check_runs.timeout_of(settings) == settings.timeout_s == 300.0
    assert 100 < gpu_check_runs.timeout_of(replace(settings, deadline=time.monotonic() + 120)) <= 120
    assert gpu_check_runs.timeout_of(replace(settings, deadline=time.monotonic() - 5)) == 10.0


def test_a_failed_run_is_read_back_with_its_error_and_no_numbers(tmp_path):
    output = "loading ...\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory\n"
    result = {"command": "distill.py", "returncode": 1, "timed_out": False, "seconds": 1.0, "log": "x.log"}
    run = gpu_check_runs.read_run(tmp_path, {**result, "output": output})
    assert run["error"] == "loading ... | Traceback (most recent call last): | RuntimeError: CUDA out of memory"
    assert "steps" not in run and run["resumed_at_step"] is None and "output" not in run
    assert gpu_check.run_failures(run, 400)[0].startswith("distill.py exited with 1: loading ...")
    timed_out = gpu_check_runs.read_run(tmp_path, {**result, "returncode": -9, "timed_out": True, "output": ""})
    assert timed_out["error"] == "timed out"
    resumed = gpu_check_runs.read_run(
        tmp_path, {**result, "output": "resumed from /o/checkpoint-20 at step 20 (epoch 1, batch 16)\n"}
    )
    assert resumed["resumed_at_step"] == 20


def test_the_device_information_of_a_cuda_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H200 #{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 5))
    info = gpu_check.device_info(cuda=True)
    assert info["gpus"] == ["NVIDIA H200 #0", "NVIDIA H200 #1"] and info["gpu_count"] == 2
    assert (info["capability"], info["nccl"]) == ("9.0", "2.27.5") and info["bitsandbytes"]
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: 2708)
    assert gpu_check.device_info(cuda=True)["nccl"] == "2708"
