"""Reliability across the scripts: bad input, interruption, numerical faults and untrusted files.

docs/reliability.md lists every case and the test that holds it; the cases the module tests already
cover (test_data.py's bad FASTA table, test_architecture.py's checkpoint refusals, ...) are not
repeated. The bad-input table runs each script's main through cli.run, as its `__main__` block
does (in-process: milliseconds a row); one row per script, the signals and kill -9 run real
processes. Tiny models throughout: a d=64 random teacher with ProtBert's vocabulary, d=32 students.
"""

import gzip
import importlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
import evaluate
from architecture import ResidueTokenizer, Student, StudentConfig, load_student, save_student
from conftest import tiny_student, write_short_uniprot
from pepemb import checkpoints, cli, data, teacher_targets
from pepemb.checkpoints import TRAINING_STATE, list_checkpoints
from pepemb.teacher import PROTBERT_VOCAB, load_teacher, save_random_teacher

REPO = Path(__file__).resolve().parent.parent
HUGE = 100_000  # residues of the longest protein fed to every script
# Tiny models run as fast on one thread, and a busy machine then cannot stall them: OpenMP
# threads spin-waiting for a core made a step 30x slower under load.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------------


def random_protein(id_: str, length: int, seed: int) -> data.Protein:
    rng = random.Random(seed)
    return data.Protein(id_, "", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, protbert_teacher_dir, esm_teacher_dir) -> dict[str, str]:
    """Paths the table's argv templates name: good and bad FASTA files, good and bad checkpoints."""
    root = tmp_path_factory.mktemp("inputs")
    shipped = data.read_fasta(data.SHIPPED_UNIPROT)[:8]
    good = [data.Protein(p.id, p.description, p.sequence[:40]) for p in shipped]
    data.write_fasta(root / "good.fasta", good)
    data.write_fasta(root / "huge.fasta", [random_protein("huge", HUGE, 0), *good[:2]])
    (root / "empty.fasta").write_bytes(b"")
    (root / "binary.fasta").write_bytes(bytes(range(256)) * 4)
    (root / "corrupt.fasta.gz").write_bytes(gzip.compress((root / "good.fasta").read_bytes())[:60])
    (root / "digits.fasta").write_bytes(b">P1\nMKTAIL\n>P2\nMKT42AIL\n")
    (root / "no_test").mkdir()
    data.write_fasta(root / "no_test" / "train.fasta", good)

    torch.manual_seed(0)
    tokenizer = load_teacher(str(protbert_teacher_dir)).tokenizer
    student = Student(StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=1))
    save_student(student, root / "student", {"teacher": str(protbert_teacher_dir), "max_seq_len": 32})
    model_pt = (root / "student" / "model.pt").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.pt").write_bytes(model_pt[: len(model_pt) // 2])
    # A checkpoint-STEP folder whose model.pt is cut short (training_state.pt is never reached).
    (root / "truncated_checkpoint").mkdir()
    (root / "truncated_checkpoint" / "model.pt").write_bytes(model_pt[: len(model_pt) // 2])
    (root / "truncated_checkpoint" / TRAINING_STATE).write_bytes(b"")
    # ProtBert's vocabulary with 64 learned positions: it takes at most 62 residues.
    save_random_teacher(root / "short_teacher", kind="protbert", max_positions=64)
    names = {p.name.split(".")[0]: str(p) for p in root.iterdir()}
    return {
        **names,
        "teacher": str(protbert_teacher_dir),
        "esm": str(esm_teacher_dir),
        "nowhere": str(root / "nowhere"),
    }


TINY_STUDENT = [
    *tiny_student(),
    "--max_seq_len",
    "32",
    "--warmup_steps",
    "0",
    "--learning_rate",
    "3e-3",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def trained_run_and_inputs(tmp_path_factory, protbert_teacher_dir) -> tuple[Path, list]:
    """A finished 4-step run (checkpoint-2, checkpoint-4) on a split folder whose training split
    holds a 100,000-residue protein, two all-X sequences and two records with the same id; and
    what the student saw: (training?, input_ids) of every Student.forward call of the run."""
    seen = []
    real_forward = Student.forward

    def recording_forward(self, input_ids=None, *args, **kwargs):
        seen.append((self.training, input_ids.detach().clone()))
        return real_forward(self, input_ids, *args, **kwargs)

    root = tmp_path_factory.mktemp("trained")
    split = root / "data"
    proteins = data.read_fasta(data.SHIPPED_UNIPROT)[:50]
    cropped = [data.Protein(p.id, p.description, p.sequence[:40]) for p in proteins]
    odd = [
        random_protein("huge", HUGE, 1),
        data.Protein("all_x", "", "X" * 30),
        data.Protein("all_x_short", "", "X" * 5),
        data.Protein("dup", "first", "MKTAYIAKQRQISFVK"),
        data.Protein("dup", "second", "GSHMSLFDFFKNKGSA"),
    ]
    data.write_fasta(split / "train.fasta", cropped[:40] + odd)
    data.write_fasta(split / "val.fasta", cropped[40:46] + odd[:1])
    data.write_fasta(split / "test.fasta", cropped[46:])
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Student, "forward", recording_forward)
        distill.main(trained_run_argv(split, out, protbert_teacher_dir))
    return out, seen


@pytest.fixture(scope="module")
def trained_run(trained_run_and_inputs) -> Path:
    return trained_run_and_inputs[0]


def trained_run_argv(split: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    """trained_run's distill.py arguments, and `extra` (a repeated flag overrides)."""
    return [
        "--data_path",
        str(split),
        "--output_dir",
        str(out),
        "--teacher_model",
        str(teacher),
        *TINY_STUDENT,
        "--batch_size",
        "16",
        "--max_steps",
        "4",
        "--save_every",
        "2",
        "--eval_every",
        "2",
        "--keep_last",
        "0",
        "--log_every",
        "1",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# How a user error must look, and what it must leave alone
# --------------------------------------------------------------------------------------------


def assert_user_error(code: int, stderr: str, message: str) -> None:
    """Exit 2, no traceback, exactly one `error:` line, the last one, containing `message`."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], stderr


def finite_weights(checkpoint: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_student(checkpoint).model.state_dict().values())


def snapshot(folder: Path) -> dict:
    """Every file under folder: (content, modification time)."""
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def run_in_process(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """The script's main under cli.run, as `python SCRIPT.py ARGV` runs it: (exit code, stderr)."""
    main = importlib.import_module(script).main
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            cli.run(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def run_script(script: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / f"{script}.py"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ONE_THREAD,
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or overwritten
# --------------------------------------------------------------------------------------------

# What each script's output folder holds before a bad run: an earlier result (or, for distill, a
# stray file) that must survive byte for byte. embed gets --overwrite, so that its refusal of an
# existing output folder does not hide the error under test (and --overwrite must not clear
# anything before the input is known to be good).
EARLIER_OUTPUT = {
    "distill": "notes.txt",
    "evaluate": "report.json",
    "embed": "manifest.json",
    "visualization": "summary.json",
    "download_sample_data": "train.fasta",
}

DISTILL = [
    "--data_path",
    "{good}",
    "--output_dir",
    "{out}",
    "--teacher_model",
    "{teacher}",
    *TINY_STUDENT,
    "--batch_size",
    "4",
    "--max_steps",
    "2",
]
EVALUATE = [
    "--model_path",
    "{student}",
    "--data_path",
    "{good}",
    "--output_dir",
    "{out}",
    "--teacher_model",
    "none",
    "--speed_batches",
    "0",
    "--device",
    "cpu",
]
VISUALIZE = ["--model_path", "{student}", "--output_dir", "{out}", "--device", "cpu", "--n_steps", "2"]
DOWNLOAD = ["--output_dir", "{out}", "--offline", "--num_sequences", "20"]

# (id, script, argv, words of the one-line message). A repeated flag overrides the base's.
BAD_INPUT = [
    ("distill: missing data folder", "distill", [*DISTILL, "--data_path", "{nowhere}"], "no such file or folder"),
    ("distill: empty FASTA", "distill", [*DISTILL, "--data_path", "{empty}"], "file is empty"),
    ("distill: binary FASTA", "distill", [*DISTILL, "--data_path", "{binary}"], "binary content"),
    ("distill: digits in a sequence", "distill", [*DISTILL, "--data_path", "{digits}"], "invalid character '4'"),
    (
        "distill: output folder inside a file",
        "distill",
        [*DISTILL, "--output_dir", "{file}/out"],
        "which is a file; pass a folder",
    ),
    ("distill: negative size", "distill", [*DISTILL, "--d_model", "-32"], "--d_model must be positive"),
    ("distill: negative temperature", "distill", [*DISTILL, "--temperature", "-1"], "--temperature must be > 0"),
    ("distill: missing teacher", "distill", [*DISTILL, "--teacher_model", "{nowhere}"], "does not exist"),
    (
        "distill: resume from a non-checkpoint",
        "distill",
        [*DISTILL, "--resume", "{student}"],
        "not a checkpoint folder",
    ),
    (
        "distill: resume from a truncated checkpoint",
        "distill",
        [*DISTILL, "--resume", "{truncated_checkpoint}"],
        "truncated",
    ),
    ("evaluate: missing checkpoint", "evaluate", [*EVALUATE, "--model_path", "{nowhere}"], "no such checkpoint"),
    ("evaluate: truncated checkpoint", "evaluate", [*EVALUATE, "--model_path", "{truncated}"], "truncated"),
    ("evaluate: corrupt gzip", "evaluate", [*EVALUATE, "--data_path", "{corrupt}"], "corrupt or truncated gzip"),
    ("evaluate: missing data", "evaluate", [*EVALUATE, "--data_path", "{nowhere}"], "no such file"),
    (
        "evaluate: data folder without test.fasta",
        "evaluate",
        [*EVALUATE, "--data_path", "{no_test}"],
        "needs test.fasta",
    ),
    ("evaluate: missing teacher", "evaluate", [*EVALUATE, "--teacher_model", "{nowhere}"], "does not exist"),
    (
        "evaluate: output folder inside a file",
        "evaluate",
        [*EVALUATE, "--output_dir", "{file}/out"],
        "which is a file; pass a folder",
    ),
    ("evaluate: mask_prob out of range", "evaluate", [*EVALUATE, "--mask_prob", "1.5"], "--mask_prob"),
    ("embed: missing FASTA", "embed", ["{student}", "{nowhere}", "{out}", "--overwrite"], "no such file"),
    ("embed: empty FASTA", "embed", ["{student}", "{empty}", "{out}", "--overwrite"], "file is empty"),
    ("embed: truncated checkpoint", "embed", ["{truncated}/model.pt", "{good}", "{out}", "--overwrite"], "truncated"),
    ("embed: missing model", "embed", ["{nowhere}", "{good}", "{out}", "--overwrite"], "does not exist"),
    ("embed: output folder inside a file", "embed", ["{student}", "{good}", "{file}/out"], "which is a file"),
    ("embed: export folder inside a file", "embed", ["{student}", "--export_hf", "{file}/hf"], "which is a file"),
    (
        "visualization: truncated checkpoint",
        "visualization",
        [*VISUALIZE, "--model_path", "{truncated}", "--sequence", "MKTV"],
        "truncated",
    ),
    ("visualization: digits in a FASTA", "visualization", [*VISUALIZE, "--fasta", "{digits}"], "invalid character '4'"),
    (
        "visualization: 100,000 residues",
        "visualization",
        [*VISUALIZE, "--fasta", "{huge}"],
        "100,000 residues, more than --max_length 1022",
    ),
    (
        "visualization: longer than the teacher's positions",
        "visualization",
        [*VISUALIZE, "--sequence", "MKTAYIAKQR" * 8, "--teacher_model", "{short_teacher}"],
        "takes at most 62",  # 64 positions less the start and end tokens
    ),
    (
        "visualization: output folder inside a file",
        "visualization",
        [*VISUALIZE, "--sequence", "MKTV", "--output_dir", "{file}/out"],
        "which is a file",
    ),
    (
        "visualization: zero integration steps",
        "visualization",
        [*VISUALIZE, "--sequence", "MKTV", "--n_steps", "0"],
        "--n_steps must be at least 1",
    ),
    (
        "visualization: missing teacher",
        "visualization",
        [*VISUALIZE, "--sequence", "MKTV", "--teacher_model", "{nowhere}"],
        "does not exist",
    ),
    (
        "download: output folder inside a file",
        "download_sample_data",
        [*DOWNLOAD, "--output_dir", "{file}/out"],
        "which is a file",
    ),
    (
        "download: zero sequences",
        "download_sample_data",
        [*DOWNLOAD, "--num_sequences", "0"],
        "--num_sequences must be at least 1",
    ),
    (
        "download: min_length above max_length",
        "download_sample_data",
        [*DOWNLOAD, "--min_length", "50", "--max_length", "10"],
        "--min_length <= --max_length",
    ),
]
# One row per script also runs as a real process: the entry point, not only main().
AS_PROCESS = [
    "distill: binary FASTA",
    "evaluate: truncated checkpoint",
    "embed: output folder inside a file",
    "visualization: 100,000 residues",
    "download: zero sequences",
]


def prepare_case(script: str, argv: list[str], inputs: dict, tmp_path: Path) -> list[str]:
    """argv with its paths filled in; tmp_path gets the earlier output and a plain file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / EARLIER_OUTPUT[script]).write_text("an earlier result\n")
    (tmp_path / "file").write_text("a file, not a folder\n")
    return [a.format(**inputs, out=out, file=tmp_path / "file") for a in argv]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(case, inputs, tmp_path, capsys):
    _, script, argv, message = case
    argv = prepare_case(script, argv, inputs, tmp_path)
    before = snapshot(tmp_path)
    code, stderr = run_in_process(script, argv, capsys)
    assert_user_error(code, stderr, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", AS_PROCESS)
def test_bad_input_as_a_process(name, inputs, tmp_path):
    _, script, argv, message = next(c for c in BAD_INPUT if c[0] == name)
    argv = prepare_case(script, argv, inputs, tmp_path)
    before = snapshot(tmp_path)
    result = run_script(script, argv)
    assert_user_error(result.returncode, result.stderr, message)
    assert snapshot(tmp_path) == before


def test_existing_run_is_refused_as_a_process(trained_run, inputs, tmp_path):
    out = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(out)
    result = run_script("distill", [a.format(**inputs, out=out) for a in DISTILL])
    assert_user_error(result.returncode, result.stderr, "already holds a training run; pass --resume auto")
    assert snapshot(out) == before


def test_overwrite_with_bad_input_keeps_the_earlier_run(trained_run, inputs, tmp_path, capsys):
    out = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(out)
    argv = [a.format(**inputs, out=out) for a in DISTILL] + ["--data_path", inputs["empty"], "--overwrite"]
    assert_user_error(*run_in_process("distill", argv, capsys), "file is empty")
    assert snapshot(out) == before


def test_resume_with_another_vocabulary_or_size_is_refused(trained_run, inputs, tmp_path, capsys):
    out = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(out)
    base = [a.format(**inputs, out=out) for a in DISTILL] + [
        "--resume",
        "auto",
        "--data_path",
        str(trained_run.parent / "data"),
    ]
    for change in (["--teacher_model", inputs["esm"]], ["--d_model", "64"]):
        code, stderr = run_in_process("distill", base + change, capsys)
        assert_user_error(code, stderr, "holds a different student")
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["truncated", "carries code"])
def test_resume_from_a_damaged_training_state_is_one_line(damage, trained_run, inputs, tmp_path, capsys):
    out = shutil.copytree(trained_run, tmp_path / "run")
    state = out / "checkpoint-4" / TRAINING_STATE
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        torch.save({"position": CreatesFile(tmp_path / "payload-ran")}, state)
    argv = [a.format(**inputs, out=out) for a in DISTILL] + [
        "--resume",
        "auto",
        "--data_path",
        str(trained_run.parent / "data"),
    ]
    assert_user_error(*run_in_process("distill", argv, capsys), str(state))


# --------------------------------------------------------------------------------------------
# Odd but valid input: 100,000 residues, all-X sequences, duplicate ids
# --------------------------------------------------------------------------------------------


def crop_starts(huge: str, tokenizer, input_ids: torch.Tensor) -> list[int]:
    """Where in `huge` each row of input_ids that is a window of it starts: the offset whose
    30 residues the row's 30 agree with best, where most agree (masking changes about 13%)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokenizer.encode(huge)[1:-1].numpy(), 30)
    starts = []
    for row in input_ids[:, 1:31].numpy():
        agreement = (windows == row).mean(1) if len(row) == 30 else np.zeros(1)
        if agreement.max() > 0.6:  # another protein agrees with its best window on about a fifth
            starts.append(int(agreement.argmax()))
    return starts


def test_distill_crops_a_100000_residue_protein_and_trains_on_all_x_and_duplicate_ids(trained_run_and_inputs):
    trained_run, seen = trained_run_and_inputs
    train = data.read_fasta(trained_run.parent / "data" / "train.fasta")
    huge = next(p.sequence for p in train if p.id == "huge")
    assert len(train) == 45 and len(huge) == HUGE
    assert [p.id for p in train].count("dup") == 2 and sum(set(p.sequence) == {"X"} for p in train) == 2
    summary = json.loads((trained_run / "summary.json").read_text())
    # 45 sequences in batches of 16: the 4 steps see all of them, each cropped to 30 residues
    assert summary["steps"] == 4
    assert [p.name for p in list_checkpoints(trained_run)] == ["checkpoint-2", "checkpoint-4"]
    assert finite_weights(trained_run / "checkpoint-4")
    # What the student was given: never more than --max_seq_len 32 tokens; the huge protein as a
    # 30-residue window, a random one in training and the N-terminal one in validation.
    assert seen and all(ids.shape[1] <= 32 for _, ids in seen)
    tokenizer = load_student(trained_run / "checkpoint-4").tokenizer
    trained = [s for training, ids in seen if training for s in crop_starts(huge, tokenizer, ids)]
    validated = [s for training, ids in seen if not training for s in crop_starts(huge, tokenizer, ids)]
    assert trained and all(start > 0 for start in trained), trained
    assert validated == [0, 0, 0], validated  # validation at steps 0, 2 and 4 (--eval_every 2)


def test_evaluate_crops_a_100000_residue_protein_and_scores_all_x(inputs, tmp_path):
    report = evaluate.evaluate_checkpoint(
        inputs["student"], inputs["huge"], tmp_path / "eval", max_seq_len=32, speed_batches=1, device="cpu"
    )
    assert report["setup"]["sequences"] == 3 and report["counts"]["residues"] == 3 * 30
    all_x = tmp_path / "all_x.fasta"
    data.write_fasta(all_x, [data.Protein("all_x", "", "X" * 50)])
    report = evaluate.evaluate_checkpoint(inputs["student"], all_x, tmp_path / "eval_x", speed_batches=0, device="cpu")
    assert report["metrics"]["baseline"] == {"residue": "X", "frequency": 1.0, "masked_acc": 1.0}
    assert list(report["per_residue"]) == ["X"] and report["counts"]["nonstandard_masked"] >= 1
    for model in ("student", "teacher"):
        assert 0 < report["metrics"][model]["perplexity"] < float("inf")


@pytest.mark.parametrize("long, embedded", [("chunk", HUGE), ("truncate", 500)])
def test_embed_chunks_or_truncates_a_100000_residue_protein(long, embedded, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        inputs["student"],
        inputs["huge"],
        str(out),
        "--long",
        long,
        "--max_length",
        "500",
        "--overlap",
        "50",
        "--include",
        "mean",
        "per_tok",
    ]
    assert run_in_process("embed", argv, capsys)[0] == 0
    npz = np.load(out / "embeddings.npz")
    assert list(npz["ids"]) == ["huge", *[p.id for p in data.read_fasta(inputs["good"])[:2]]]
    assert npz["lengths"][0] == embedded and np.isfinite(npz["mean_layer_1"]).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["chunked" if long == "chunk" else "truncated"] == 1


def test_all_x_sequence_is_kept_and_embedded(inputs, tmp_path, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">all_x\nXXXXXXXXXXXXXXXXXXXX\n>tiny_x\nx\n")
    assert [p.sequence for p in data.read_fasta(fasta)] == ["X" * 20, "X"]
    assert run_in_process("embed", [inputs["student"], str(fasta), str(tmp_path / "out")], capsys)[0] == 0
    npz = np.load(tmp_path / "out" / "embeddings.npz")
    assert list(npz["lengths"]) == [20, 1] and np.isfinite(npz["mean_layer_1"]).all()


def test_visualization_keeps_records_with_duplicate_ids_apart(inputs, tmp_path, capsys):
    fasta = tmp_path / "dup.fasta"
    fasta.write_text(">dup first\nMKTAYIAKQR\n>dup second\nXXXXXXXX\n")
    out = tmp_path / "vis"
    argv = [
        "--model_path",
        inputs["student"],
        "--fasta",
        str(fasta),
        "--output_dir",
        str(out),
        "--target_position",
        "2",
        "--n_steps",
        "2",
        "--device",
        "cpu",
    ]
    assert run_in_process("visualization", argv, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [(s["id"], Path(s["output_dir"]).name, s["length"]) for s in summary["sequences"]]
    assert [(i, n) for i, _, n in records] == [("dup", 10), ("dup", 8)]
    first, second = (name for _, name, _ in records)
    assert first == "dup" and second.startswith("dup-") and len(second) == len("dup-") + 8
    assert any((out / first).iterdir()) and any((out / second).iterdir())


# --------------------------------------------------------------------------------------------
# Interruption: signals, kill -9
# --------------------------------------------------------------------------------------------

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc as on Linux")


class Distill:
    """distill.py as a background process, logging to files (a pipe would fill up and block it)."""

    def __init__(self, teacher_dir, fasta: Path, out: Path, *extra: str):
        self.out = out
        log = out.parent / f"{out.name}-{time.monotonic_ns()}"
        self.stdout_path, self.stderr_path = Path(f"{log}.out"), Path(f"{log}.err")
        argv = [
            "--data_path",
            str(fasta),
            "--output_dir",
            str(out),
            "--teacher_model",
            str(teacher_dir),
            *TINY_STUDENT,
            "--batch_size",
            "4",
            "--save_every",
            "1",
            "--keep_last",
            "0",
            "--eval_every",
            "1000",
            "--log_every",
            "1",
            "--num_epochs",
            "1000",
            *extra,
        ]
        if "--max_steps" not in extra:
            argv += ["--max_steps", "1000000"]  # runs until stopped
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "distill.py"), *argv],
                stdout=stdout,
                stderr=stderr,
                cwd=REPO,
                env=ONE_THREAD,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, condition, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"distill.py exited ({self.process.returncode}):\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"timed out:\n{self.stderr[-3000:]}")
            time.sleep(0.001)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=90)


def newest_step(out: Path) -> int:
    found = list_checkpoints(out) if out.is_dir() else []
    return int(found[-1].name.split("-")[-1]) if found else -1


def assert_checkpoints_complete(out: Path, unpruned: bool = True) -> list[Path]:
    """Every checkpoint a resume may pick loads (weights and training state) and names its own
    step; `unpruned` (--keep_last 0): every checkpoint-STEP folder is one of them."""
    folders = list_checkpoints(out)
    if unpruned:
        assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(p.name for p in folders)
    for folder in folders:
        step = int(folder.name.split("-")[-1])
        assert load_student(folder).metadata["step"] == step
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        assert state["position"]["step"] == step
    return folders


@pytest.fixture(scope="module")
def interrupt_fasta(tmp_path_factory) -> Path:
    """60 shipped UniProt proteins cut to 40 residues: 48 train, 6 val, 6 test; 12 steps an epoch."""
    return write_short_uniprot(tmp_path_factory.mktemp("interrupt") / "small.fasta", 60, 40)


@linux_only
def test_sigterm_and_sigint_save_a_checkpoint_and_resume_auto_finishes(protbert_teacher_dir, interrupt_fasta, tmp_path):
    out = tmp_path / "run"
    step = -1
    for signum, flags in ((signal.SIGTERM, []), (signal.SIGINT, ["--resume", "auto"])):
        run = Distill(protbert_teacher_dir, interrupt_fasta, out, *flags)
        run.wait_for(lambda step=step: newest_step(out) > step)
        assert run.stop(signum) == 128 + signum
        stderr = run.stderr
        assert "Traceback" not in stderr
        assert "resume with: python distill.py <same arguments> --resume auto" in stderr
        stopped_at = int(stderr.split(f"stopped by {signal.Signals(signum).name} at step ")[1].split(";")[0])
        assert newest_step(out) == stopped_at > step  # the checkpoint of the step it stopped at
        if step >= 0:
            assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in run.stdout
        step = stopped_at
    assert_checkpoints_complete(out)

    last = Distill(protbert_teacher_dir, interrupt_fasta, out, "--resume", "auto", "--max_steps", str(step + 2))
    assert last.process.wait(timeout=120) == 0, last.stderr
    assert f"resumed from {out / f'checkpoint-{step}'}" in last.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


class HeldRequest(BaseHTTPRequestHandler):
    """Answers nothing until the test lets it go: a download that waits on the network."""

    def do_GET(self):
        self.server.arrived.set()
        self.server.release.wait(60)

    def log_message(self, *args):
        pass


def fifo_has_a_reader(fifo: Path, writers: list) -> bool:
    """Whether a process has opened `fifo` to read (and now waits for its data); keeps the
    writing end open in `writers`, so that the reader waits on."""
    try:
        writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:  # ENXIO: nobody reads it yet
        return False


@linux_only
@pytest.mark.parametrize("script", ["evaluate", "embed", "download_sample_data"])
def test_ctrl_c_outside_training_prints_interrupted_and_exits_130(script, inputs, tmp_path):
    # A real SIGINT to a real process while it waits: for the FASTA it reads (a named pipe that
    # gets no data), or for UniProt's answer (a local server that never gives one).
    out, fifo, writers = tmp_path / "out", tmp_path / "proteins.fasta", []
    os.mkfifo(fifo)
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeldRequest)
    server.daemon_threads, server.arrived, server.release = True, threading.Event(), threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv, waiting = {
        "evaluate": ([a.format(**inputs, out=out) for a in EVALUATE] + ["--data_path", str(fifo)], None),
        "embed": ([inputs["student"], str(fifo), str(out)], None),
        "download_sample_data": (
            ["--output_dir", str(out), "--base_url", f"http://127.0.0.1:{server.server_address[1]}", "--retries", "0"],
            server.arrived.is_set,
        ),
    }[script]
    waiting = waiting or (lambda: fifo_has_a_reader(fifo, writers))
    process = subprocess.Popen(
        [sys.executable, str(REPO / f"{script}.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=ONE_THREAD,
    )
    try:
        deadline = time.monotonic() + 120
        while not waiting():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.01)
        # A signal that lands between Python's check for signals and the blocking read is only
        # seen once the read returns, which here is never: send it once the process sleeps in it.
        while not asleep_in_a_system_call(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        for fd in writers:
            os.close(fd)
        server.release.set()
        server.shutdown()
        server.server_close()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []  # nothing half written


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def asleep_in_a_system_call(pid: int, settle_s: float = 0.05) -> bool:
    """Whether the process's main thread sleeps, and still sleeps `settle_s` later (so it is in
    the wait itself, not passing through a short sleep on the way to it)."""
    if process_state(pid) != "S":
        return False
    time.sleep(settle_s)
    return process_state(pid) == "S"


def checkpoints_being_written(out: Path) -> list[str]:
    return [e.name for e in os.scandir(out) if e.name.startswith(".checkpoint-")] if out.is_dir() else []


@linux_only
def test_kill_9_at_any_moment_keeps_every_checkpoint_whole(protbert_teacher_dir, interrupt_fasta, tmp_path):
    out = tmp_path / "run"
    # 1. Frozen (SIGSTOP) while a checkpoint is half written, one complete before it, then killed.
    run = Distill(protbert_teacher_dir, interrupt_fasta, out)
    while True:
        run.wait_for(lambda: newest_step(out) >= 1 and checkpoints_being_written(out))
        run.process.send_signal(signal.SIGSTOP)
        while process_state(run.process.pid) != "T":
            time.sleep(0.001)
        half_written = checkpoints_being_written(out)
        if half_written:
            break
        run.process.send_signal(signal.SIGCONT)  # that write finished meanwhile: catch the next
    run.process.kill()
    run.process.wait()
    assert (out / half_written[0]).is_dir()
    assert half_written[0] not in [p.name for p in assert_checkpoints_complete(out)]

    # 2. Resumed, then killed as soon as it has written a new checkpoint. (Frozen after its
    # training_state.pt but before its rename, the copy was complete: the resume renames it in.)
    before = newest_step(out)
    if (out / half_written[0] / TRAINING_STATE).exists():
        before = int(half_written[0].split("-")[1].split(".")[0])
    run = Distill(protbert_teacher_dir, interrupt_fasta, out, "--resume", "auto")
    run.wait_for(lambda: newest_step(out) > before)
    run.process.kill()
    run.process.wait()
    assert f"resumed from {out / f'checkpoint-{before}'}" in run.stdout
    assert_checkpoints_complete(out)

    # 3. Resumed, then killed at a random moment: loading, training or writing.
    run = Distill(protbert_teacher_dir, interrupt_fasta, out, "--resume", "auto")
    time.sleep(random.Random(os.getpid()).uniform(0.5, 6.0))
    run.process.kill()
    run.process.wait()
    assert_checkpoints_complete(out)

    # 4. Resumed from the newest complete checkpoint, to the end.
    newest = newest_step(out)
    last = Distill(protbert_teacher_dir, interrupt_fasta, out, "--resume", "auto", "--max_steps", str(newest + 2))
    assert last.process.wait(timeout=120) == 0, last.stderr
    assert f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in last.stdout
    assert newest_step(out) == newest + 2
    assert_checkpoints_complete(out)


# The kill tests below: a fresh process saves checkpoints, armed to kill itself (SIGKILL, a real
# kill -9: nothing after it runs, no finally, no atexit) at one exact call of os.replace or
# shutil.rmtree, the calls that a checkpoint replacement and pruning are made of. Just before
# dying it prints what each folder in the output folder holds, which pins the point of the kill.
# argv: the kill as JSON {"call": "replace" or "rmtree", "names": [...], "when": "before" or
# "after"} (replace: the [source, target] names; rmtree: the folder names, deleted midway), then
# the output folder.
KILL_PRELUDE = r"""
import json, os, shutil, signal, sys
from pathlib import Path

kill, out = json.loads(sys.argv[1]), Path(sys.argv[2])
armed = True
real_replace, real_rmtree = os.replace, shutil.rmtree

def die():
    held = {e.name: sorted(os.listdir(e.path)) for e in os.scandir(out) if e.is_dir()}
    print("SIGKILL " + json.dumps(held), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):
    hit = armed and kill["call"] == "replace" and [Path(src).name, Path(dst).name] == kill["names"]
    if hit and kill["when"] == "before":
        die()
    real_replace(src, dst)
    if hit:
        die()

def rmtree(path, *args, **kwargs):
    if armed and kill["call"] == "rmtree" and Path(path).name in kill["names"] and Path(path).is_dir():
        (Path(path) / "model.pt").unlink()  # midway: one file deleted for real
        die()
    real_rmtree(path, *args, **kwargs)

os.replace, shutil.rmtree = replace, rmtree
"""

# Then argv: keep_last, and the saves STEP:COPY in order (the kill is armed for the last one
# only). Each save follows one optimizer step of a tiny student (every copy differs), and what it
# saves is also kept in ../STEP-COPY.pt, to compare with.
SAVE_AND_KILL = (
    KILL_PRELUDE
    + r"""
import torch

from architecture import ResidueTokenizer, Student, StudentConfig
from pepemb import checkpoints
from pepemb.losses import LossWeights
from pepemb.training_step import StudentTrainer

keep_last, saves = int(sys.argv[3]), [save.split(":") for save in sys.argv[4:]]
torch.manual_seed(0)
vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] L A G V E S I K R D T P N Q F Y M H C W X U B Z O".split()
config = StudentConfig.from_tokenizer(ResidueTokenizer.from_vocab(vocab), d_model=32, num_heads=2, num_layers=1)
student = Student(config)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
scaler = torch.amp.GradScaler("cpu", enabled=False)
weights = LossWeights(temperature=1.0, distill_weight=1.0, task_weight=1.0)
trainer = StudentTrainer(student, None, optimizer, scheduler, scaler, weights, "masked", 0.0, torch.device("cpu"))
out.mkdir()
for i, (step, copy) in enumerate(saves):
    sum((p**2).sum() for p in student.parameters()).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    position = {**checkpoints.new_position(1), "step": int(step), "elapsed_s": float(i)}
    expected = {"copy": copy, "weights": student.state_dict(), "position": position}
    torch.save(expected, out.parent / f"{step}-{copy}.pt")
    armed = i == len(saves) - 1
    checkpoints.save_checkpoint(out, trainer, position, {"step": int(step), "copy": copy}, keep_last)
print("saved, never killed", flush=True)
"""
)

# Then argv: distill.py's arguments.
DISTILL_AND_KILL = KILL_PRELUDE + "\nimport distill\n\ndistill.main(sys.argv[3:])\n"

CHECKPOINT_FILES = {"model.pt", "config.json", TRAINING_STATE}


def killed_child(script: str, kill: dict, out: Path, *argv: str) -> dict[str, bool]:
    """Run `script` in a fresh process; assert that it died by SIGKILL at the armed call. Returns
    the folders the output folder held at that instant, each with whether it was complete."""
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(kill), str(out), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ONE_THREAD,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL and "SIGKILL " in result.stdout, (
        f"no kill at {kill}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    held = json.loads(result.stdout.split("SIGKILL ", 1)[1].splitlines()[0])
    return {name: CHECKPOINT_FILES <= set(files) for name, files in held.items()}


def recover_as_distill_does(out: Path) -> Path | None:
    """What `distill.py --resume auto` does to the output folder before it trains (check_output_dir,
    resolve_resume, start_output_dir); asserts that no hidden leftover remains. Returns the
    checkpoint it resumes from (None: it would start fresh)."""
    out = checkpoints.check_output_dir(str(out), "auto", overwrite=False)
    resume_from = checkpoints.resolve_resume("auto", out)
    step = int(resume_from.name.split("-")[1]) if resume_from else None
    checkpoints.start_output_dir(out, overwrite=False, resumed_step=step)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    return resume_from


def assert_holds(folder: Path, expected: Path) -> None:
    """`folder` loads (load_student, read_checkpoint) and holds, weights and training state alike,
    the copy that the child kept in `expected`."""
    want = torch.load(expected, weights_only=True)
    saved = load_student(folder)
    weights, state = checkpoints.read_checkpoint(folder, saved.model.config)
    assert saved.metadata["copy"] == want["copy"]
    assert weights.keys() == want["weights"].keys()
    assert all(torch.equal(weights[k], want["weights"][k]) for k in weights)
    assert state["position"] == want["position"]


# Each point of saving step 4 again over a complete checkpoint-4: (the kill, what the folder held
# then: folder -> complete, the copy that the recovered checkpoint-4 holds).
SAVE_AGAIN_KILLS = {
    "new copy complete": (
        {"call": "replace", "names": ["checkpoint-4", ".checkpoint-4.old"], "when": "before"},
        {"checkpoint-4": True, ".checkpoint-4.tmp": True},
        "old",  # checkpoint-4 was never touched; the new copy is dropped
    ),
    "old copy moved aside": (
        {"call": "replace", "names": ["checkpoint-4", ".checkpoint-4.old"], "when": "after"},
        {".checkpoint-4.old": True, ".checkpoint-4.tmp": True},
        "new",  # no checkpoint-4: the complete new copy is renamed in
    ),
    "new copy renamed in": (
        {"call": "replace", "names": [".checkpoint-4.tmp", "checkpoint-4"], "when": "after"},
        {"checkpoint-4": True, ".checkpoint-4.old": True},
        "new",
    ),
    "old copy half deleted": (
        {"call": "rmtree", "names": [".checkpoint-4.old", "checkpoint-4"], "when": "midway"},
        {"checkpoint-4": True, ".checkpoint-4.old": False},
        "new",
    ),
}


@linux_only
@pytest.mark.parametrize("point", SAVE_AGAIN_KILLS)
def test_a_kill_while_a_step_is_saved_again_keeps_its_checkpoint(point, tmp_path):
    kill, held, survivor = SAVE_AGAIN_KILLS[point]
    out = tmp_path / "run"
    assert killed_child(SAVE_AND_KILL, kill, out, "0", "4:old", "4:new") == held
    assert recover_as_distill_does(out) == out / "checkpoint-4"
    assert [p.name for p in out.iterdir()] == ["checkpoint-4"]
    assert_holds(out / "checkpoint-4", tmp_path / f"4-{survivor}.pt")


# --keep_last 1: saving checkpoint-2 prunes checkpoint-1. (the kill, what the folder held then,
# the folders after recovery.)
PRUNE_KILLS = {
    "moved aside": (
        {"call": "replace", "names": ["checkpoint-1", ".checkpoint-1.old"], "when": "after"},
        {"checkpoint-2": True, ".checkpoint-1.old": True},
        ["checkpoint-1", "checkpoint-2"],  # still whole: renamed back, to be pruned at the next save
    ),
    "half deleted": (
        {"call": "rmtree", "names": [".checkpoint-1.old", "checkpoint-1"], "when": "midway"},
        {"checkpoint-2": True, ".checkpoint-1.old": False},
        ["checkpoint-2"],
    ),
}


@linux_only
@pytest.mark.parametrize("point", PRUNE_KILLS)
def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(point, tmp_path):
    kill, held, kept = PRUNE_KILLS[point]
    out = tmp_path / "run"
    assert killed_child(SAVE_AND_KILL, kill, out, "1", "1:old", "2:new") == held
    assert recover_as_distill_does(out) == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == kept
    assert_holds(out / "checkpoint-2", tmp_path / "2-new.pt")
    if "checkpoint-1" in kept:
        assert_holds(out / "checkpoint-1", tmp_path / "1-old.pt")


@linux_only
def test_a_run_resumed_after_a_kill_mid_replacement_starts_from_the_new_copy(
    trained_run, protbert_teacher_dir, tmp_path, capsys
):
    # A run resumed from checkpoint-2 saves step 4 again, and is killed with the old checkpoint-4
    # moved aside and the new one not yet renamed in.
    out = shutil.copytree(trained_run, tmp_path / "run")
    data_path = trained_run.parent / "data"
    kill = {"call": "replace", "names": ["checkpoint-4", ".checkpoint-4.old"], "when": "after"}
    again = trained_run_argv(data_path, out, protbert_teacher_dir, "--resume", str(out / "checkpoint-2"))
    held = killed_child(DISTILL_AND_KILL, kill, out, *again)
    assert "checkpoint-4" not in held and held[".checkpoint-4.old"] and held[".checkpoint-4.tmp"]

    capsys.readouterr()
    distill.main(trained_run_argv(data_path, out, protbert_teacher_dir, "--resume", "auto", "--max_steps", "6"))
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    # checkpoint-4 is the copy of the killed run: the one that records its --resume
    assert load_student(out / "checkpoint-4").metadata["distill_args"]["resume"] == str(out / "checkpoint-2")
    assert [p.name for p in assert_checkpoints_complete(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------------------------
# Numerical faults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_one_non_finite_loss_is_skipped_with_a_warning_and_training_goes_on(
    value, protbert_teacher_dir, interrupt_fasta, tmp_path, monkeypatch
):
    live = teacher_targets.TeacherTargets.__call__
    training_batches = []

    def third_batch_poisoned(self, batch, variant):
        out = live(self, batch, variant)
        if variant != data.VALIDATION_VARIANT:
            training_batches.append(variant)
            if len(training_batches) == 3:
                out["logits"] = torch.full_like(out["logits"], value)
        return out

    monkeypatch.setattr(teacher_targets.TeacherTargets, "__call__", third_batch_poisoned)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"non-finite loss at step 3; step skipped \(1 in a row\)") as caught:
        distill.main(
            [
                "--data_path",
                str(interrupt_fasta),
                "--output_dir",
                str(out),
                "--teacher_model",
                str(protbert_teacher_dir),
                *TINY_STUDENT,
                "--batch_size",
                "4",
                "--num_epochs",
                "1",
                "--eval_every",
                "100",
                "--save_every",
                "100",
            ]
        )
    assert sum("non-finite loss" in str(w.message) for w in caught) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert len(training_batches) == 12 and summary["steps"] == 11  # 48 sequences / 4, one step skipped
    assert finite_weights(out / "checkpoint-11")
    assert math.isfinite(summary["final_val"]["loss"])


def test_a_non_finite_loss_goes_backward_then_its_gradients_are_dropped_before_any_step(
    protbert_teacher_dir, interrupt_fasta, tmp_path, monkeypatch
):
    # The order of the finiteness check: backward runs on every loss (under DDP every rank must
    # join the gradient all-reduce, whatever its loss), the check comes after it, and a non-finite
    # loss's gradients are cleared before the next step, which never sees them.
    live, real_backward, real_step = (
        teacher_targets.TeacherTargets.__call__,
        torch.Tensor.backward,
        distill.optimizer_step,
    )
    events, training_batches = [], []

    def third_batch_poisoned(self, batch, variant):
        out = live(self, batch, variant)
        if variant != data.VALIDATION_VARIANT:
            training_batches.append(variant)
            if len(training_batches) == 3:
                out["logits"] = torch.full_like(out["logits"], float("nan"))
        return out

    def recorded_backward(self, *args, **kwargs):
        events.append(("backward", bool(torch.isfinite(self).all())))
        return real_backward(self, *args, **kwargs)

    def recorded_step(trainer, *args, **kwargs):
        grads = [p.grad for p in trainer.student.parameters() if p.grad is not None]
        events.append(("step", bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)))
        return real_step(trainer, *args, **kwargs)

    monkeypatch.setattr(teacher_targets.TeacherTargets, "__call__", third_batch_poisoned)
    monkeypatch.setattr(torch.Tensor, "backward", recorded_backward)
    monkeypatch.setattr(distill, "optimizer_step", recorded_step)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 3; step skipped"):
        distill.main(
            [
                "--data_path",
                str(interrupt_fasta),
                "--output_dir",
                str(tmp_path / "run"),
                "--teacher_model",
                str(protbert_teacher_dir),
                *TINY_STUDENT,
                "--batch_size",
                "4",
                "--max_steps",
                "5",
                "--eval_every",
                "100",
                "--save_every",
                "100",
            ]
        )
    backward, step = ("backward", True), ("step", True)
    # batches 1, 2: stepped; 3 (NaN): backward, no step; 4, 5, 6: stepped on finite gradients only
    assert events == [backward, step, backward, step, ("backward", False), *[backward, step] * 3]


@pytest.fixture(scope="module")
def nan_teacher_dir(protbert_teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher with one NaN weight: every logit it gives is NaN."""
    from transformers import AutoModelForMaskedLM

    directory = shutil.copytree(protbert_teacher_dir, tmp_path_factory.mktemp("nan_teacher") / "teacher")
    model = AutoModelForMaskedLM.from_pretrained(directory)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(directory)
    return directory


def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_last_checkpoint(
    trained_run, nan_teacher_dir, tmp_path, capsys
):
    out = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(out)
    argv = trained_run_argv(
        trained_run.parent / "data",
        out,
        nan_teacher_dir,
        "--max_steps",
        "100",
        "--resume",
        "auto",
        "--max_bad_steps",
        "2",
    )
    with pytest.warns(UserWarning, match="non-finite loss") as caught:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(distill.main, argv)
    assert [str(w.message) for w in caught if "non-finite" in str(w.message)] == [
        f"non-finite loss at step 5; step skipped ({n} in a row)" for n in (1, 2)
    ]
    stderr = capsys.readouterr().err
    assert_user_error(exit_info.value.code, stderr, "2 non-finite losses in a row at step 4")
    assert f"checkpoint is kept in {out}" in stderr
    assert snapshot(out) == before  # nothing trained, saved or logged
    assert newest_step(out) == 4


# --------------------------------------------------------------------------------------------
# Untrusted files and code
# --------------------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this creates a file: the kind of code a hostile checkpoint would carry."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_resume_never_runs_code_in_a_training_state(trained_run, inputs, tmp_path, capsys):
    out = shutil.copytree(trained_run, tmp_path / "run")
    payload_ran = tmp_path / "payload-ran"
    state = out / "checkpoint-4" / TRAINING_STATE
    torch.save({"position": CreatesFile(payload_ran)}, state)
    argv = [a.format(**inputs, out=out) for a in DISTILL] + [
        "--resume",
        "auto",
        "--data_path",
        str(trained_run.parent / "data"),
    ]
    before = snapshot(out)
    # Refused by torch.load(weights_only=True): exit 2, one line naming the file, nothing written.
    code, stderr = run_in_process("distill", argv, capsys)
    assert_user_error(code, stderr, f"{state}: unreadable or unsafe training state")
    assert not payload_ran.exists()
    assert snapshot(out) == before
    # The control: the same file does run its code when fully unpickled, so the refusal mattered.
    torch.load(state, weights_only=False)
    assert payload_ran.exists()


def test_remote_code_runs_only_when_asked(protbert_teacher_dir, inputs, tmp_path, monkeypatch, capsys):
    from pepemb import teacher as teacher_module

    calls = []
    for cls in (teacher_module.AutoTokenizer, teacher_module.AutoModelForMaskedLM):
        real = cls.from_pretrained

        def recording(source, *args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", False)))
            return _real(source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    load_teacher(str(protbert_teacher_dir))
    assert calls == [("AutoTokenizer", False), ("AutoModelForMaskedLM", False)]
    calls.clear()
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    teacher = ["--teacher_model", str(protbert_teacher_dir)]
    runs = {
        "distill": [*DISTILL, "--max_steps", "1"],
        "evaluate": [*EVALUATE, *teacher, "--mutation_proteins", "0", "--embedding_proteins", "0"],
        "cache_teacher": ["--data_path", "{good}", "--teacher_cache", "{out}", *teacher, "--max_seq_len", "32"],
        "embed": [str(protbert_teacher_dir), str(fasta), "{out}"],
        "visualization": [*VISUALIZE, "--sequence", "MKTAYIAKQR", *teacher],
    }
    for script, argv in runs.items():
        for flags, expected in (([], False), (["--trust_remote_code"], True)):
            out = tmp_path / f"{script}{len(flags)}"
            code, stderr = run_in_process(script, [a.format(**inputs, out=out) for a in argv] + flags, capsys)
            if script == "visualization" and flags:  # it has no such flag: never runs a teacher's code
                assert code == 2 and "unrecognized arguments: --trust_remote_code" in stderr
                assert calls == [] and not out.exists()
                continue
            assert code == 0, stderr
            assert calls == [("AutoTokenizer", expected), ("AutoModelForMaskedLM", expected)], script
            calls.clear()


def test_wandb_key_is_never_printed_or_written(protbert_teacher_dir, interrupt_fasta, tmp_path, monkeypatch, capfd):
    key = "reliabilitytestkey" + "0123456789" * 3
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    distill.main(
        [
            "--data_path",
            str(interrupt_fasta),
            "--output_dir",
            str(out),
            "--teacher_model",
            str(protbert_teacher_dir),
            *TINY_STUDENT,
            "--batch_size",
            "8",
            "--max_steps",
            "2",
            "--use_wandb",
            "--wandb_run_name",
            "reliability",
        ]
    )
    assert list((out / "wandb").glob("offline-run-*"))
    printed = capfd.readouterr()
    assert key not in printed.out and key not in printed.err
    leaking = [p for p in out.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaking == []


def test_writable_folder_refuses_a_read_only_folder_without_creating_anything(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(cli.UserError, match=f"no permission to write in {locked}"):
        cli.writable_folder(locked / "a" / "b", "--output_dir")
    assert list(locked.iterdir()) == []


# --------------------------------------------------------------------------------------------
# File modes: every file a script writes follows the user's umask
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_written_follows_the_umask(umask, inputs, interrupt_fasta, tmp_path, capsys):
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    mapped = Student(
        StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=1, teacher_hidden_size=8)
    )
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nGSHMSLFDFF\n")
    root = tmp_path / "written"
    teacher, student = inputs["teacher"], inputs["student"]
    runs = [
        ("distill", [*DISTILL, "--max_steps", "1"]),
        ("evaluate", EVALUATE),
        ("embed", [student, str(fasta), str(root / "embed")]),
        ("embed", [str(root / "mapped"), "--export_hf", str(root / "hf")]),  # with teacher_map.safetensors
        ("visualization", [*VISUALIZE, "--sequence", "MKTV"]),
        ("download_sample_data", DOWNLOAD),
        ("cache_teacher", ["--data_path", str(interrupt_fasta), "--teacher_model", teacher, "--max_seq_len", "32"]),
    ]
    previous = os.umask(umask)
    try:
        save_student(mapped, root / "mapped")
        for i, (script, argv) in enumerate(runs):
            out = root / f"{script}-{i}"
            argv = [a.format(**inputs, out=out) for a in argv]
            if script == "cache_teacher":
                argv += ["--teacher_cache", str(out)]
            code, stderr = run_in_process(script, argv, capsys)
            assert code == 0, stderr
    finally:
        os.umask(previous)
    modes = {p.relative_to(root): p.stat().st_mode & 0o777 for p in root.rglob("*")}
    expected = {p: (0o777 if (root / p).is_dir() else 0o666) & ~umask for p in modes}
    assert {p: oct(m) for p, m in modes.items()} == {p: oct(m) for p, m in expected.items()}
    assert {p.name for p in modes} >= {"model.safetensors", "teacher_map.safetensors", "summary.json", "model.pt"}
