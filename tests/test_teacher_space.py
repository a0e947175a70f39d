"""Embeddings in the teacher's space: distill.py --embedding_weight trains a map saved with the
student, from a live teacher or a cache that never loads it; embed.py --space teacher and
evaluate.py use it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_teacher
import distill
import embed
import evaluate
from architecture import ResidueTokenizer, Student, StudentConfig, load_student, mean_pooled
from conftest import write_short_uniprot
from pepemb import cli, data, heldout
from pepemb.losses import distillation_loss
from pepemb.teacher import PROTBERT_VOCAB, load_teacher
from pepemb.teacher_space import LeastSquaresMap
from pepemb.teacher_targets import teacher_embeddings

SHARED = ["--max_seq_len", "40", "--batch_size", "8", "--mask_variants", "2", "--seed", "3", "--device", "cpu"]


def test_the_embedding_term_is_one_minus_r2_by_hand():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 30), torch.full((2, 5), -100)
    labels[:, 2] = 7
    student, teacher = torch.randn(2, 6), torch.randn(2, 6)
    terms = distillation_loss(
        logits,
        None,
        labels,
        torch.ones(2, 5),
        temperature=1.0,
        distill_weight=0.0,
        task_weight=1.0,
        student_embedding=student,
        teacher_embedding=teacher,
        embedding_weight=0.5,
        embedding_scale=2.0,
    )
    expected = ((student - teacher) ** 2).mean() / 2.0
    assert terms["emb"].item() == pytest.approx(expected.item())
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + 0.5 * expected.item())


def test_the_student_embedding_is_the_mean_over_residues_and_the_map_its_image():
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    torch.manual_seed(0)
    student = Student(
        StudentConfig.from_tokenizer(tokenizer, d_model=16, num_heads=2, num_layers=1, teacher_hidden_size=6)
    ).eval()
    ids, mask = tokenizer.batch_encode(["MKTAYIAK", "GSH"])
    with torch.no_grad():
        out = student(ids, mask, output_hidden_states=True, output_embedding=True)
    last = out["hidden_states"][-1]
    by_hand = torch.stack([last[0, 1:9].mean(0), last[1, 1:4].mean(0)])  # residues only, no start/end
    torch.testing.assert_close(out["embedding"], by_hand)
    torch.testing.assert_close(mean_pooled(last, mask), by_hand)
    torch.testing.assert_close(out["teacher_embedding"], student.teacher_map(by_hand))


def test_teacher_embeddings_are_the_teachers_mean_last_hidden_state(protbert_teacher_dir):
    teacher = load_teacher(str(protbert_teacher_dir))
    sequences = ["MKTAYIAKQRQISF", "GSHMSL", "ACDEFGHIKLMNPQRSTVWY" * 3]
    table = teacher_embeddings(teacher, sequences, max_seq_len=24, batch_size=2)
    for row, sequence in zip(table, sequences):
        ids = teacher.tokenizer.encode(sequence[:22])[None]  # evaluation's crop: the first 22 residues
        hidden = teacher(ids, torch.ones_like(ids), output_hidden_states=True)["hidden_states"][0, 1:-1]
        np.testing.assert_allclose(row, hidden.mean(0).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def runs(protbert_teacher_dir, tmp_path_factory):
    """A live run with --embedding_weight, and the same run from a cache that cache_teacher.py filled."""
    root = tmp_path_factory.mktemp("teacher_space")
    fasta = write_short_uniprot(root / "prot.fasta", 64, 38)
    flags = ["--data_path", str(fasta), "--teacher_model", str(protbert_teacher_dir), *SHARED]
    student = [
        "--d_model",
        "32",
        "--num_heads",
        "2",
        "--num_layers",
        "1",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
        "--num_epochs",
        "6",
        "--eval_every",
        "1000",
        "--log_every",
        "2",
        "--embedding_weight",
        "1.0",
    ]
    live = distill.train(distill.build_parser().parse_args([*flags, *student, "--output_dir", str(root / "live")]))
    cache_teacher.main([*flags, "--teacher_cache", str(root / "cache"), "--embeddings"])
    cached = distill.train(
        distill.build_parser().parse_args(
            [*flags, *student, "--teacher_cache", str(root / "cache"), "--output_dir", str(root / "cached")]
        )
    )
    return root, fasta, live, cached


def val_records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if json.loads(line)["split"] == "val"]


@pytest.mark.slow  # two short distillations and a cache fill
def test_distillation_fits_the_map_and_saves_it_with_the_student(runs):
    root, _, live, cached = runs
    records = val_records(root / "live")
    assert records[-1]["emb"] < 0.5 * records[0]["emb"]  # 1 - R^2 on held-out proteins falls
    checkpoint = load_student(root / "live" / "best_model")
    assert checkpoint.model.config.teacher_hidden_size == 64 and checkpoint.model.teacher_map is not None
    # from the cache: the teacher is never loaded, the embedding targets come from the cache
    assert not cached["teacher_loaded"] and cached["teacher_batches"]["live"] == 0
    assert json.loads((root / "cache" / "manifest.json").read_text())["complete"]["embeddings"] is True
    assert val_records(root / "cached")[-1]["emb"] < val_records(root / "cached")[0]["emb"]


@pytest.mark.slow
def test_embed_writes_teacher_space_embeddings(runs, tmp_path):
    root, fasta, _, _ = runs
    assert_exit(0, [root / "live" / "best_model", fasta, tmp_path / "out", "--space", "teacher"])
    arrays = np.load(tmp_path / "out" / "embeddings.npz")
    checkpoint = load_student(root / "live" / "best_model")
    assert arrays["mean_teacher"].shape == (64, 64) and arrays["mean_layer_1"].shape == (64, 32)
    with torch.no_grad():
        mapped = checkpoint.model.teacher_map(torch.from_numpy(arrays["mean_layer_1"])).numpy()
    np.testing.assert_allclose(arrays["mean_teacher"], mapped, atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher_embedding_dim"] == 64 and manifest["settings"]["space"] == "teacher"


@pytest.mark.slow
def test_embed_refuses_teacher_space_without_a_map(tmp_path, protbert_teacher_dir):
    fasta = write_short_uniprot(tmp_path / "p.fasta", 3, 20)
    assert_exit(2, [protbert_teacher_dir, fasta, tmp_path / "out", "--space", "teacher"])


@pytest.mark.slow
def test_evaluate_reports_the_teacher_space(runs, tmp_path):
    root, fasta, _, _ = runs
    report = evaluate.evaluate_checkpoint(
        root / "live" / "best_model", fasta, tmp_path, speed_batches=0, device="cpu", mutation_proteins=0
    )
    space = report["fidelity"]["teacher_space"]
    assert space["proteins"] == 64 and -1 <= space["centred_cosine"] <= 1 and space["r2"] < 1
    assert "teacher space: cosine with the teacher's embedding, both centred" in (tmp_path / "report.md").read_text()


def test_teacher_space_measures_by_hand():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 5)) + 10.0  # a large shared mean: raw cosines near 1
    perfect = heldout.teacher_space_measures(torch.from_numpy(truth), torch.from_numpy(truth))
    assert perfect["centred_cosine"] == pytest.approx(1.0) and perfect["r2"] == pytest.approx(1.0)
    assert perfect["knn_overlap"] == 1.0
    mean_only = heldout.teacher_space_measures(
        torch.from_numpy(np.tile(truth.mean(0), (30, 1))), torch.from_numpy(truth)
    )
    assert mean_only["raw_cosine"] > 0.99 and mean_only["r2"] == pytest.approx(0.0, abs=1e-9)
    noisy = truth + rng.normal(size=truth.shape)
    measured = heldout.teacher_space_measures(torch.from_numpy(noisy), torch.from_numpy(truth))
    centred_truth, centred = truth - truth.mean(0), noisy - truth.mean(0)
    cosines = (centred * centred_truth).sum(1) / np.linalg.norm(centred, axis=1) / np.linalg.norm(centred_truth, axis=1)
    assert measured["centred_cosine"] == pytest.approx(cosines.mean())
    assert measured["r2"] == pytest.approx(1 - ((noisy - truth) ** 2).sum() / (centred_truth**2).sum())


def assert_exit(code, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(embed.main, [str(a) for a in argv])
    assert exit_info.value.code == code


def test_data_batches_carry_the_sequence_index():
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    batch = data.masked_batch(["MKTAY", "GSHMS", "ACDEF"], [2, 0], tokenizer, 12, 0.15, 0, 0)
    assert batch["sequence_index"].tolist() == [2, 0]  # what the embedding table is indexed by


def test_least_squares_map_recovers_a_planted_affine_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    weights, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    fitted = LeastSquaresMap.fit(torch.from_numpy(x), x @ weights + bias)
    new = rng.normal(size=(5, 4))
    np.testing.assert_allclose(fitted(torch.from_numpy(new)), new @ weights + bias, atol=1e-9)
    np.testing.assert_allclose(fitted.weight, weights, atol=1e-9)  # noiseless data: the map itself
    np.testing.assert_allclose(fitted.bias, bias, atol=1e-9)
    stored = LeastSquaresMap(weight=fitted.weight.copy(), bias=fitted.bias.copy())  # as a checkpoint keeps it
    np.testing.assert_array_equal(stored(new), fitted(torch.from_numpy(new)))


def test_least_squares_map_is_the_regression_line_by_hand():
    # x = 0, 1, 2, 3 and y = 1, 3, 2, 5: mean x 1.5, mean y 2.75, sum of (x - 1.5)(y - 2.75) = 5.5,
    # sum of (x - 1.5)^2 = 5, so slope 5.5 / 5 = 1.1 and intercept 2.75 - 1.1 * 1.5 = 1.1
    fitted = LeastSquaresMap.fit(np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [2.0], [5.0]]))
    assert fitted.weight.shape == (1, 1) and fitted.bias.shape == (1,)
    assert fitted.weight[0, 0] == pytest.approx(1.1) and fitted.bias[0] == pytest.approx(1.1)
    np.testing.assert_allclose(fitted(np.array([[10.0]])), [[12.1]])


@pytest.mark.slow  # a cache fill of 300 chains with embeddings, three 4-step students
def test_the_teacher_space_benchmark_scores_three_students(tmp_path):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    teacher_space = importlib.import_module("teacher_space")
    results = teacher_space.main(["--quick", "--steps", "4", "--output_dir", str(tmp_path / "out")])
    students = results["students"]
    assert sorted(students) == ["kd", "kd-emb", "mlm"] and all(s["steps"] == 4 for s in students.values())
    assert "distilled_map" in students["kd-emb"] and "distilled_map" not in students["mlm"]
    for s in students.values():
        assert 0 <= s["least_squares_map"]["knn_overlap"] <= 1 and s["least_squares_map"]["proteins"] == 100
        assert -1 <= s["mutation_spearman"] <= 1 and s["training_s"] > 0
    assert "| kd-emb | distilled map |" in (tmp_path / "out" / "teacher_space.md").read_text()
