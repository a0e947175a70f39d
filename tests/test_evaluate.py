"""evaluate.py against metrics recomputed by hand from the two models' logits."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from architecture import STANDARD_RESIDUES, Student, StudentConfig, load_student, save_student
from pepemb import data, fidelity
from pepemb.cli import UserError
from pepemb.data import MaskedBatches, Masking
from pepemb.teacher import load_teacher

# Three short sequences; with max_seq_len 24 the second is cropped to its first 22 residues.
SEQUENCES = ["MSSGSTVKSLLE", "QVQLVESGGGLVQPGGSLRLSCAASGFTFS", "DIQMTQSPSSLSASVGDR"]
MAX_SEQ_LEN, MASK_PROB, SEED, BATCH_SIZE = 24, 0.4, 3, 2
EVAL_OPTIONS = dict(batch_size=BATCH_SIZE, mask_prob=MASK_PROB, seed=SEED, speed_batches=2, device="cpu")


@pytest.fixture(scope="module")
def teacher(protbert_teacher_dir):
    return load_teacher(str(protbert_teacher_dir))


def save_tiny_student(directory, teacher, metadata, most_likely=None):
    """A random 1-layer student; with `most_likely`, its head always predicts that residue."""
    torch.manual_seed(0)
    model = Student(StudentConfig.from_tokenizer(teacher.tokenizer, d_model=32, num_heads=2, num_layers=1))
    if most_likely is not None:
        with torch.no_grad():
            model.lm_head.bias[teacher.tokenizer.vocab.index(most_likely)] = 100.0
    save_student(model, directory, metadata)
    return directory


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher, protbert_teacher_dir):
    metadata = {"teacher": str(protbert_teacher_dir), "max_seq_len": MAX_SEQ_LEN}
    return save_tiny_student(tmp_path_factory.mktemp("student"), teacher, metadata)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.fasta"
    data.write_fasta(path, [data.Protein(f"p{i}", "", s) for i, s in enumerate(SEQUENCES)])
    return path


@pytest.fixture(scope="module")
def report(student_dir, fasta, tmp_path_factory):
    """Evaluated against the teacher recorded in the checkpoint."""
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate.evaluate_checkpoint(student_dir, fasta, out, **EVAL_OPTIONS)


def masked_logits(student, teacher, tokenizer):
    """Student logits, teacher logits and true ids at every masked position of the fixed masks."""
    batches = MaskedBatches(
        SEQUENCES,
        tokenizer,
        Masking(max_seq_len=MAX_SEQ_LEN, mask_prob=MASK_PROB, seed=SEED, batch_size=BATCH_SIZE),
        epoch=0,
        train=False,
    )
    s, t, y = [], [], []
    with torch.no_grad():
        for i in range(len(batches)):
            batch = batches[i]
            masked = batch["labels"] != -100
            s.append(student(batch["input_ids"], batch["attention_mask"])["logits"][masked])
            t.append(teacher(batch["input_ids"], batch["attention_mask"])["logits"][masked])
            y.append(batch["labels"][masked])
    return torch.cat(s), torch.cat(t), torch.cat(y)


def test_metrics_match_a_hand_computation(report, student_dir, teacher):
    _, report = report
    checkpoint = load_student(student_dir)
    s, t, y = masked_logits(checkpoint.model, teacher, checkpoint.tokenizer)
    assert len(y) > 10  # 2 batches; the forced mask guarantees at least one per sequence
    log_p_s, log_p_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    m = report["metrics"]
    assert report["counts"]["masked_tokens"] == len(y)
    assert m["student"]["masked_acc"] == pytest.approx((s.argmax(-1) == y).float().mean().item())
    assert m["teacher"]["masked_acc"] == pytest.approx((t.argmax(-1) == y).float().mean().item())
    assert m["agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).float().mean().item())
    nll = -log_p_s[torch.arange(len(y)), y]
    assert m["student"]["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item()
    assert m["kl_teacher_student"] == pytest.approx(kl, rel=1e-4)
    teacher_nll = -log_p_t[torch.arange(len(y)), y]
    assert m["teacher"]["perplexity"] == pytest.approx(math.exp(teacher_nll.mean().item()), rel=1e-5)


def test_fixed_masks_do_not_depend_on_the_batching(report, student_dir, fasta, tmp_path):
    # each sequence's mask comes from its own seed: one batch per sequence, or any other batching,
    # masks the same positions the same way (and distill.py's validation masks are these masks)
    _, batched = report
    options = {**EVAL_OPTIONS, "speed_batches": 0}
    for i, batching in enumerate([{"batch_size": 1}, {"max_tokens": 72}]):
        other = evaluate.evaluate_checkpoint(student_dir, fasta, tmp_path / str(i), **{**options, **batching})
        assert other["setup"]["batches"] != batched["setup"]["batches"]
        assert other["counts"] == batched["counts"] and other["per_residue"] == batched["per_residue"]
        for who in ("student", "teacher"):
            assert other["metrics"][who]["perplexity"] == pytest.approx(batched["metrics"][who]["perplexity"], rel=1e-5)
        assert other["metrics"]["kl_teacher_student"] == pytest.approx(
            batched["metrics"]["kl_teacher_student"], rel=1e-4
        )


def test_per_residue_counts_add_up_to_the_totals(report):
    _, report = report
    per_residue, n = report["per_residue"], report["counts"]["masked_tokens"]
    assert sum(r["masked_count"] for r in per_residue.values()) == n
    for who in ("student", "teacher"):
        correct = sum(r[f"{who}_correct"] for r in per_residue.values())
        assert correct == round(report["metrics"][who]["masked_acc"] * n)
        for r in per_residue.values():
            assert r[f"{who}_acc"] == r[f"{who}_correct"] / r["masked_count"]
    # Frequencies are over every evaluated residue, the second sequence cropped to 22.
    evaluated = Counter("".join(s[: MAX_SEQ_LEN - 2] for s in SEQUENCES))
    assert report["counts"]["residues"] == sum(evaluated.values()) == 12 + 22 + 18
    for residue, r in per_residue.items():
        assert r["frequency"] == evaluated[residue] / sum(evaluated.values())


def test_constant_predictor_scores_the_baseline(teacher, fasta, tmp_path):
    evaluated = Counter("".join(s[: MAX_SEQ_LEN - 2] for s in SEQUENCES))
    (common, top), (_, second) = evaluated.most_common(2)
    assert top > second  # no tie: the baseline residue is unambiguous
    student = save_tiny_student(tmp_path / "student", teacher, {"max_seq_len": MAX_SEQ_LEN}, most_likely=common)
    report = evaluate.evaluate_checkpoint(student, fasta, tmp_path / "out", teacher_model="none", **EVAL_OPTIONS)
    baseline, per_residue = report["metrics"]["baseline"], report["per_residue"]
    assert baseline["residue"] == common
    assert baseline["frequency"] == top / sum(evaluated.values())
    assert report["metrics"]["student"]["masked_acc"] == baseline["masked_acc"] > 0
    assert baseline["masked_acc"] == per_residue[common]["masked_count"] / report["counts"]["masked_tokens"]
    assert per_residue[common]["student_acc"] == 1.0
    assert all(r["student_acc"] == 0.0 for residue, r in per_residue.items() if residue != common)


def test_output_files(report, student_dir):
    out, report = report
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert "| masked accuracy |" in markdown and "| residue | masked |" in markdown
    assert f"| {next(iter(report['per_residue']))} |" in markdown
    png = (out / "per_residue_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000

    speed = report["speed"]
    for who in ("student", "teacher"):
        assert speed[who]["sequences_per_s"] > 0 and speed[who]["batches"] == 2
        assert speed[who]["tokens"] == 12 + 22 + 18 + 3 * 2  # both batches: every residue, cls and eos
    assert speed["speedup"]["tokens_per_s"] == pytest.approx(
        speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]
    )
    student = load_student(student_dir).model
    # fp32 weights, the tied embedding counted once; rotary tables are not saved state.
    assert speed["student"]["weights_mb"] == student.num_parameters() * 4 / 2**20
    params = report["parameters"]
    assert params["compression"] == params["teacher"] / params["student"] > 1


def test_without_teacher_from_the_command_line(student_dir, fasta, tmp_path, capsys):
    evaluate.main(
        [
            "--model_path",
            str(student_dir / "model.pt"),
            "--data_path",
            str(fasta),
            "--output_dir",
            str(tmp_path),
            "--teacher_model",
            "none",
            "--device",
            "cpu",
            "--speed_batches",
            "1",
            "--max_sequences",
            "2",
        ]
    )
    assert "| masked accuracy |" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["teacher"] is None and report["metrics"]["agreement"] is None
    assert report["setup"]["sequences"] == 2 and report["parameters"]["teacher"] is None
    assert set(report["speed"]) == {"student"}
    assert all(r["teacher_acc"] is None for r in report["per_residue"].values())
    assert (tmp_path / "per_residue_accuracy.png").exists()


def test_split_folder_uses_its_test_fasta(student_dir, fasta, tmp_path):
    with pytest.raises(UserError, match="test.fasta"):
        evaluate.evaluate_checkpoint(student_dir, tmp_path, tmp_path / "out", teacher_model="none")
    (tmp_path / "test.fasta").write_text(">a\nMKV\n")
    report = evaluate.evaluate_checkpoint(
        student_dir, tmp_path, tmp_path / "out", teacher_model="none", speed_batches=0
    )
    assert report["setup"]["sequences"] == 1 and report["counts"]["residues"] == 3
    assert report["speed"] is None


def test_teacher_with_another_vocabulary_is_refused(student_dir, fasta, esm_teacher_dir, tmp_path):
    with pytest.raises(UserError, match="different vocabulary"):
        evaluate.evaluate_checkpoint(student_dir, fasta, tmp_path, teacher_model=str(esm_teacher_dir))


def test_unrecorded_teacher_must_be_named(teacher, fasta, tmp_path):
    student = save_tiny_student(tmp_path / "student", teacher, {})
    with pytest.raises(UserError, match="--teacher_model"):
        evaluate.evaluate_checkpoint(student, fasta, tmp_path / "out")


def residue_states(model, sequences, tokenizer, teacher_model: bool):
    """Last hidden states of every residue token (start/end excluded), one sequence at a time."""
    rows = []
    with torch.no_grad():
        for sequence in sequences:
            ids = tokenizer.encode(sequence[: MAX_SEQ_LEN - 2])[None]
            out = model(ids, torch.ones_like(ids), output_hidden_states=True)["hidden_states"]
            rows.append((out if teacher_model else out[-1])[0, 1:-1])
    return torch.cat(rows).double()


def test_fidelity_measures_match_a_hand_computation(report, student_dir, teacher):
    _, report = report
    measured = report["fidelity"]
    checkpoint = load_student(student_dir)
    student, tokenizer = checkpoint.model, checkpoint.tokenizer

    # mutation effects: 8 sites of each of the 3 proteins (fewer than --mutation_proteins), scored
    # by hand: mask the site, log-softmax, log p(mutant) - log p(wild type), Spearman with the teacher
    sites = fidelity.sample_mutation_sites(SEQUENCES, 8, SEED)
    wild = fidelity.wild_type_columns(SEQUENCES, sites)
    residue_ids = [tokenizer.vocab.index(a) for a in STANDARD_RESIDUES]

    def scores(model):
        rows = []
        for (protein, position), w in zip(sites, wild):
            sequence = SEQUENCES[protein]
            start = min(max(position - (MAX_SEQ_LEN - 2) // 2, 0), max(len(sequence) - (MAX_SEQ_LEN - 2), 0))
            ids = tokenizer.encode(sequence[start : start + MAX_SEQ_LEN - 2])[None]
            ids[0, position - start + 1] = tokenizer.mask_id
            with torch.no_grad():
                log_p = F.log_softmax(model(ids, torch.ones_like(ids))["logits"][0, position - start + 1].double(), -1)
            rows.append((log_p[residue_ids] - log_p[residue_ids[w]]).numpy())
        return np.array(rows)

    s, t = scores(student), scores(teacher)
    keep = np.ones_like(s, dtype=bool)
    keep[np.arange(len(sites)), wild] = False
    m = measured["mutation_effects"]
    assert (m["proteins"], m["student"]["sites"], m["student"]["pairs"]) == (3, 24, 24 * 19)
    assert m["student"]["spearman"] == pytest.approx(fidelity.spearman(s[keep], t[keep]), abs=1e-6)
    within = np.mean([fidelity.spearman(a[k], b[k]) for a, b, k in zip(s, t, keep)])
    assert m["student"]["spearman_within_position_mean"] == pytest.approx(within, abs=1e-6)

    # linear CKA over every residue token (fewer than the 20,000 sampled), by the HSIC formula
    x, y = residue_states(student, SEQUENCES, tokenizer, False), residue_states(teacher, SEQUENCES, tokenizer, True)
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n

    def hsic(a, b):
        return torch.trace(a @ a.T @ h @ b @ b.T @ h)

    reps = measured["representations"]
    assert reps["cka_tokens"] == n
    assert reps["cka"] == pytest.approx((hsic(x, y) / torch.sqrt(hsic(x, x) * hsic(y, y))).item(), rel=1e-6)
    # 3 proteins: k = 10 is clipped to the 2 others, each one's neighbours in any space (the
    # overlap itself is checked on 30 proteins below)
    assert (reps["knn_k"], reps["knn_proteins"], reps["knn_chance"]) == (2, 3, 1.0)


def nearest(embeddings: np.ndarray, k: int, cosine=True, farthest=False, itself=False) -> list[set]:
    """Each item's k nearest other items, by cosine similarity (or, wrongly, by negative Euclidean
    distance, the farthest ones, or counting the item itself), one item at a time."""
    found = []
    for i, x in enumerate(embeddings):
        if cosine:
            score = embeddings @ x / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(x))
        else:
            score = -np.linalg.norm(embeddings - x, axis=1)
        others = sorted((j for j in range(len(embeddings)) if itself or j != i), key=lambda j: score[j])
        found.append(set(others[:k] if farthest else others[-k:]))
    return found


def test_knn_overlap_of_mean_embeddings_matches_a_hand_computation(student_dir, teacher, tmp_path):
    # 30 proteins, k = 10 of the 29 others: an overlap that only the right neighbours give
    sequences = [p.sequence[: MAX_SEQ_LEN - 2] for p in data.read_fasta(data.SHIPPED_UNIPROT)[:30]]
    fasta = tmp_path / "thirty.fasta"
    data.write_fasta(fasta, [data.Protein(f"p{i}", "", s) for i, s in enumerate(sequences)])
    options = {**EVAL_OPTIONS, "speed_batches": 0}
    report = evaluate.evaluate_checkpoint(student_dir, fasta, tmp_path / "out", **options, mutation_proteins=0)
    reps = report["fidelity"]["representations"]
    assert (reps["knn_k"], reps["knn_proteins"]) == (10, 30)
    assert reps["knn_chance"] == pytest.approx(10 / 29)

    checkpoint = load_student(student_dir)
    student, tokenizer = checkpoint.model, checkpoint.tokenizer

    def mean_embeddings(model, teacher_model: bool) -> np.ndarray:
        rows = []
        for sequence in sequences:  # one at a time: no padding
            rows.append(residue_states(model, [sequence], tokenizer, teacher_model).mean(0).numpy())
        return np.array(rows)

    s, t = mean_embeddings(student, False), mean_embeddings(teacher, True)
    for e in (s, t):  # no near-tie at the 10th neighbour: the right answer is well defined
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        similarity = np.sort(unit @ unit.T - 2 * np.eye(len(e)), axis=1)[:, ::-1]
        assert (similarity[:, 9] - similarity[:, 10]).min() > 1e-7

    def overlap(**how) -> float:
        return np.mean([len(a & b) / 10 for a, b in zip(nearest(t, 10, **how), nearest(s, 10, **how))])

    expected = overlap()
    assert reps["knn_overlap"] == pytest.approx(expected, abs=1e-9)
    # what wrong neighbourhoods would give differs: the data tells them apart
    for wrong in ({"cosine": False}, {"farthest": True}, {"itself": True}):
        assert abs(overlap(**wrong) - expected) > 0.01, wrong
    assert expected not in (1.0, reps["knn_chance"])


def test_the_report_shows_fidelity_next_to_masked_accuracy(report):
    out, report = report
    markdown = (out / "report.md").read_text()
    assert "## Fidelity to the teacher beyond masked accuracy" in markdown
    spearman = report["fidelity"]["mutation_effects"]["student"]["spearman"]
    assert f"| mutation effects: Spearman with the teacher, all pairs | {spearman:.3f} |" in markdown
    assert "mutation effects: Spearman" in evaluate.summary_table(report)


def test_fidelity_can_be_skipped(student_dir, fasta, tmp_path):
    report = evaluate.evaluate_checkpoint(
        student_dir, fasta, tmp_path, **{**EVAL_OPTIONS, "speed_batches": 0}, mutation_proteins=0, embedding_proteins=0
    )
    assert report["fidelity"] is None
    assert "Fidelity" not in (tmp_path / "report.md").read_text()
