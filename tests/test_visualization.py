"""visualization.py: head statistics, Integrated Gradients, figures, tables and user errors."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import visualization as vis
from architecture import ResidueTokenizer, Student, StudentConfig, save_student
from pepemb import attention, cli, variant_scores
from pepemb.teacher import PROTBERT_VOCAB

REPO = Path(__file__).resolve().parent.parent
SEQUENCE = "MKTVRQERLKSIVRILERSKEPVS"  # the README example's first 24 residues
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    model = Student(StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=2))
    directory = tmp_path_factory.mktemp("student")
    save_student(model, directory)
    return directory


@pytest.fixture(scope="module")
def student(student_dir) -> vis.Explainer:
    return vis.load_student_explainer(str(student_dir), torch.device("cpu"))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert path.stat().st_size > 5_000, path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_head_statistics_of_hand_made_maps():
    n = 4
    identity = torch.eye(n)
    uniform = torch.full((n, n), 1 / n)
    previous = torch.zeros(n, n)  # each token attends to the one before it (token 0 to itself)
    previous[0, 0] = 1
    previous[torch.arange(1, n), torch.arange(n - 1)] = 1
    maps = torch.stack([torch.stack([identity, uniform]), torch.stack([previous, previous])])
    every_row = torch.ones(n, dtype=torch.bool)

    stats = attention.head_statistics(maps, every_row)
    assert stats["entropy"].shape == stats["distance"].shape == (2, 2)
    torch.testing.assert_close(stats["entropy"], torch.tensor([[0.0, math.log(n)], [0.0, 0.0]]))
    # uniform: row i averages |i - j| over j: rows 1.5, 1, 1, 1.5 -> 1.25; previous: 0, 1, 1, 1
    torch.testing.assert_close(stats["distance"], torch.tensor([[0.0, 1.25], [0.75, 0.75]]))

    middle_rows = torch.tensor([False, True, True, False])  # as for [cls] r r [eos]
    torch.testing.assert_close(attention.head_statistics(uniform, middle_rows)["distance"], torch.tensor(1.0))


def test_target_positions():
    assert variant_scores.parse_positions("5,10,20-22, 10", 30) == [5, 10, 20, 21, 22]
    for bad in ("0", "3-1", "a", "4-31", "5,,6"):
        with pytest.raises(cli.UserError, match="--positions"):
            variant_scores.parse_positions(bad, 30)
    targets, note = vis.choose_targets(300, None, None, max_positions=100)
    assert len(targets) == 100 and targets[0] == 1 and targets[-1] == 300
    assert np.ptp(np.diff(targets)) <= 1  # evenly spaced
    assert "100 of 300" in note
    assert vis.choose_targets(300, 7, None, 100) == ([7], None)
    assert vis.choose_targets(30, None, "2-4", 100) == ([2, 3, 4], None)
    with pytest.raises(cli.UserError, match="--target_position 31"):
        vis.choose_targets(30, 31, None, 100)


def test_attention_rows_sum_to_one(student):
    attentions = student.attentions(student.tokenizer.encode(SEQUENCE))
    assert attentions.shape == (2, 2, len(SEQUENCE) + 2, len(SEQUENCE) + 2)
    torch.testing.assert_close(attentions.sum(-1), torch.ones(attentions.shape[:-1]))
    assert (attentions >= 0).all()


def test_integrated_gradients_completeness(student):
    targets = [1, 7, 24]
    saliency = vis.integrated_gradients(student, SEQUENCE, targets, n_steps=64, progress=False)
    assert saliency.attributions.shape == (3, len(SEQUENCE))
    assert (np.abs(saliency.deltas) < 0.05 * np.abs(saliency.totals) + 1e-3).all()

    # Completeness, checked against the model itself: attributions sum to f(input) - f(baseline).
    tok = student.tokenizer
    true_ids = tok.encode(SEQUENCE)
    baseline = true_ids.clone()
    baseline[1:-1] = tok.mask_id
    for row, position in enumerate(targets):
        masked = true_ids.clone()
        masked[position] = tok.mask_id
        with torch.no_grad():
            f = student.true_residue_log_probs(torch.stack([masked, baseline]), true_ids.expand(2, -1))
        assert saliency.totals[row] == pytest.approx(float(f[0, position] - f[1, position]), abs=2e-3)
        assert saliency.attributions[row, position - 1] == 0  # the masked residue equals its baseline

    # Several targets per pass or one target over several passes: the same attributions.
    split = vis.integrated_gradients(student, SEQUENCE, targets, n_steps=64, internal_batch_size=16, progress=False)
    np.testing.assert_allclose(split.attributions, saliency.attributions, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_student_and_teacher_figures(student_dir, protbert_teacher_dir, tmp_path):
    out = tmp_path / "vis"
    vis.main(
        [
            "--model_path",
            str(student_dir / "model.pt"),
            "--sequence",
            SEQUENCE.lower(),
            "--output_dir",
            str(out),
            "--teacher_model",
            str(protbert_teacher_dir),
            "--layer",
            "2",
            "--head",
            "1",
            "--positions",
            "2-7,12",
            "--n_steps",
            "16",
            "--top_k",
            "5",
            "--device",
            "cpu",
        ]
    )

    figures = [
        "attention_layer01.png",
        "attention_layer02.png",
        "attention_layer_means.png",
        "attention_layer02_head01.png",
        "attention_head_stats.png",
        "saliency.png",
        "saliency_matrix.png",
    ]
    for name in figures:
        assert_png(out / name)
        assert_png(out / f"teacher_{name}")
    assert_png(out / "saliency_comparison.png")

    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["files"]) == sorted(str(p) for p in out.iterdir())
    result = summary["sequences"][0]
    assert result["sequence"] == SEQUENCE and result["targets"] == [2, 3, 4, 5, 6, 7, 12]
    assert -1 <= result["saliency_spearman"] <= 1
    for model in ("student", "teacher"):
        stats = result["models"][model]["head_stats"]
        assert np.array(stats["entropy_nats"]).shape == (2, 2)  # layers x heads
        assert (np.array(stats["entropy_nats"]) <= math.log(len(SEQUENCE) + 2) + 1e-4).all()
        assert result["models"][model]["integrated_gradients"]["max_relative_delta"] >= 0

    for prefix, model in (("", "student"), ("teacher_", "teacher")):
        rows = read_csv(out / f"{prefix}important_residues.csv")
        assert len(rows) == 5 and list(rows[0]) == ["position", "residue", "score"]
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0  # mean |attribution|
        assert all(SEQUENCE[int(r["position"]) - 1] == r["residue"] for r in rows)
        assert [r["position"] for r in result["models"][model]["top_residues"]] == [int(r["position"]) for r in rows]


def test_fasta_single_target(student_dir, tmp_path):
    fasta = tmp_path / "two.fasta"
    fasta.write_text(">sp|P1|ONE first\nMKTVRQERLKSIV\n>sp|P2|TWO\nGAQLAEELSVSRQVIV\n")
    out = tmp_path / "vis"
    vis.main(
        [
            "--model_path",
            str(student_dir),
            "--fasta",
            str(fasta),
            "--output_dir",
            str(out),
            "--target_position",
            "3",
            "--n_steps",
            "8",
            "--top_k",
            "20",
            "--device",
            "cpu",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [s["id"] for s in summary["sequences"]] == ["sp|P1|ONE", "sp|P2|TWO"]
    folders = [Path(s["output_dir"]) for s in summary["sequences"]]
    # pepemb.files.file_names: unsafe letters become '_' and a changed id gains a hash, so ids that
    # differ only in unsafe letters keep apart
    assert [f.parent for f in folders] == [out, out] and folders[0] != folders[1]
    for folder, prefix, length in zip(folders, ("sp_P1_ONE-", "sp_P2_TWO-"), (13, 16)):
        assert folder.name.startswith(prefix)
        assert_png(out / folder / "saliency.png")
        assert not (out / folder / "saliency_matrix.png").exists()  # only with several targets
        rows = read_csv(out / folder / "important_residues.csv")
        assert len(rows) == length - 1  # every residue but the masked target
        assert "3" not in [r["position"] for r in rows]
        assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)


@pytest.fixture(scope="module")
def foreign_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("foreign") / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    return path


ERROR_CASES = {
    "bad letter": (["--sequence", "MKT1VR"], "'1' at position 4"),
    "letter outside vocabulary": (["--sequence", "MKTJ"], "'J' at position 4"),
    "empty sequence": (["--sequence", "  "], "empty"),
    "missing checkpoint": (["--model_path", "{tmp}/nowhere", "--sequence", "MKTV"], "no such checkpoint"),
    "foreign checkpoint": (["--model_path", "{foreign}", "--sequence", "MKTV"], "not a PepEmb student"),
    "layer out of range": (["--sequence", "MKTV", "--layer", "3", "--head", "1"], "--layer 3"),
    "head out of range": (["--sequence", "MKTV", "--layer", "1", "--head", "0"], "--head 0"),
    "layer without head": (["--sequence", "MKTV", "--layer", "1"], "--layer and --head"),
    "target out of range": (["--sequence", "MKTV", "--target_position", "5"], "--target_position 5"),
    "positions out of range": (["--sequence", "MKTV", "--positions", "2-9"], "--positions"),
    "bad fasta": (["--fasta", "{tmp}/absent.fasta"], "no such file"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_write_nothing(case, student_dir, foreign_checkpoint, tmp_path, capsys):
    flags, message = ERROR_CASES[case]
    flags = [f.format(tmp=tmp_path, foreign=foreign_checkpoint) for f in flags]
    if "--model_path" not in flags:
        flags = ["--model_path", str(student_dir), *flags]
    out = tmp_path / "vis"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(vis.main, [*flags, "--output_dir", str(out), "--device", "cpu"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not out.exists()


def test_teacher_with_another_vocabulary_is_refused(student_dir, esm_teacher_dir, tmp_path):
    out = tmp_path / "vis"
    with pytest.raises(cli.UserError, match="do not share a vocabulary"):
        vis.main(
            [
                "--model_path",
                str(student_dir),
                "--sequence",
                "MKTV",
                "--output_dir",
                str(out),
                "--teacher_model",
                str(esm_teacher_dir),
                "--device",
                "cpu",
            ]
        )
    assert not out.exists()


def test_script_exits_2_with_one_line(student_dir, tmp_path):
    out = tmp_path / "vis"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "visualization.py"),
            "--model_path",
            str(student_dir),
            "--sequence",
            "MKT-VR",
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --sequence: '-' at position 4 is not an amino-acid letter of the model's "
        "vocabulary (ABCDEFGHIKLMNOPQRSTUVWXYZ)"
    ]
    assert not out.exists()
