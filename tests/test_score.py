"""score.py / pepemb/variant_scores.py: zero-shot variant scores against hand computations on a tiny student,
batching that changes nothing, scans, checked mutation files and the command line."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import score
from architecture import STANDARD_RESIDUES, ResidueTokenizer, Student, StudentConfig, save_student
from pepemb import cli, data, variant_scores
from pepemb.teacher import PROTBERT_VOCAB

PROTEINS = [data.Protein("ab1", "", "EVQLVESGGGLVQPGGSLRL"), data.Protein("ab2", "", "DIQMTQSPSSLSASVGDRVTITC")]


@pytest.fixture(scope="module")
def student():
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    torch.manual_seed(0)
    model = Student(StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval(), tokenizer


def forward(model):
    return lambda ids, mask: model(ids, mask)


def log_probs_by_hand(model, tokenizer, sequence: str, position: int, masked: bool) -> torch.Tensor:
    """log softmax at a 1-based position, the one sequence alone, that position masked or not."""
    ids = tokenizer.encode(sequence)[None]
    if masked:
        ids[0, position] = tokenizer.mask_id
    with torch.no_grad():
        return F.log_softmax(model(ids, torch.ones_like(ids))["logits"][0, position].double(), -1)


def test_masked_marginals_equal_a_hand_computation(student):
    model, tokenizer = student
    mutations = [
        variant_scores.parse_mutation("E1K", PROTEINS[0].sequence, "test", 0),
        variant_scores.parse_mutation("S7A:L11W", PROTEINS[0].sequence, "test", 0),
        variant_scores.parse_mutation("Q3R", PROTEINS[1].sequence, "test", 1),
    ]
    scores = variant_scores.score(forward(model), tokenizer, PROTEINS, mutations, "masked-marginal")
    by_hand = []
    for m in mutations:
        total = 0.0
        for wild, position, mutant in m.substitutions:  # a multi-mutant adds its sites' scores
            log_p = log_probs_by_hand(model, tokenizer, PROTEINS[m.protein].sequence, position, masked=True)
            total += (log_p[tokenizer.vocab.index(mutant)] - log_p[tokenizer.vocab.index(wild)]).item()
        by_hand.append(total)
    np.testing.assert_allclose(scores, by_hand, atol=1e-5)


def test_wt_marginals_and_pll_equal_hand_computations(student):
    model, tokenizer = student
    sequence = PROTEINS[0].sequence
    mutation = variant_scores.parse_mutation("G8A", sequence, "test", 0)
    wt = variant_scores.score(forward(model), tokenizer, PROTEINS, [mutation], "wt-marginal")[0]
    log_p = log_probs_by_hand(model, tokenizer, sequence, 8, masked=False)
    assert wt == pytest.approx((log_p[tokenizer.vocab.index("A")] - log_p[tokenizer.vocab.index("G")]).item(), abs=1e-5)

    def pll(text):
        return sum(
            log_probs_by_hand(model, tokenizer, text, i, masked=True)[tokenizer.vocab.index(a)].item()
            for i, a in enumerate(text, start=1)
        )

    pll_score = variant_scores.score(forward(model), tokenizer, PROTEINS, [mutation], "pll")[0]
    assert pll_score == pytest.approx(pll(sequence[:7] + "A" + sequence[8:]) - pll(sequence), abs=1e-4)


def test_batching_changes_no_score(student):
    model, tokenizer = student
    mutations = variant_scores.scan(PROTEINS, None)
    one_pass = variant_scores.score(forward(model), tokenizer, PROTEINS, mutations, "masked-marginal", max_tokens=10**6)
    small = variant_scores.score(forward(model), tokenizer, PROTEINS, mutations, "masked-marginal", max_tokens=30)
    windowed = variant_scores.score(
        forward(model), tokenizer, PROTEINS, mutations, "masked-marginal", max_tokens=30, max_len=12
    )  # long proteins: a window centred on each site
    np.testing.assert_allclose(small, one_pass, atol=1e-5)
    assert not np.allclose(windowed, one_pass)  # 10 residues of context are another question


def test_a_scan_has_19_substitutions_per_residue_and_never_the_wild_type():
    mutations = variant_scores.scan(PROTEINS, None)
    assert len(mutations) == 19 * sum(len(p.sequence) for p in PROTEINS)
    assert all(m.substitutions[0][0] != m.substitutions[0][2] for m in mutations)
    assert {m.text for m in mutations if m.protein == 0 and m.substitutions[0][1] == 1} == {
        f"E1{aa}" for aa in STANDARD_RESIDUES if aa != "E"
    }
    assert len(variant_scores.scan(PROTEINS[:1], "2-4,9")) == 4 * 19


@pytest.mark.parametrize(
    "line, message",
    [
        ("ab1,A1K", "line 2: A1K: residue 1 is E, not A"),
        ("ab1,E99K", "line 2: E99K: position 99 is outside the sequence (20 residues)"),
        ("ab1,E1J", "line 2: E1J: 'J' is not one of the 20 standard residues"),
        ("ab9,E1K", "line 2: no sequence with id 'ab9'"),
        ("ab1,1EK", "line 2: '1EK' is not a mutation like A23G"),
    ],
)
def test_bad_mutation_lines_fail_with_one_line_and_write_nothing(line, message, tmp_path, capsys):
    fasta = tmp_path / "p.fasta"
    data.write_fasta(fasta, PROTEINS)
    variants = tmp_path / "variants.csv"
    variants.write_text(f"id,mutation\n{line}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(score.main, ["no/such/model", str(fasta), str(tmp_path / "out"), "--mutations", str(variants)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()  # checked before any model is loaded or file written


@pytest.mark.slow  # two tiny models through the command line
def test_the_command_line_scans_and_compares(student, tmp_path, protbert_teacher_dir):
    model, _ = student
    save_student(model, tmp_path / "student")
    fasta = tmp_path / "p.fasta"
    data.write_fasta(fasta, PROTEINS)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            score.main,
            [
                str(tmp_path / "student"),
                str(fasta),
                str(tmp_path / "out"),
                "--scan",
                "--compare_with",
                str(protbert_teacher_dir),
                "--device",
                "cpu",
            ],
        )
    assert exit_info.value.code == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 19 * 43 and rows[0].keys() >= {"id", "mutation", "score", "strategy", "teacher_score"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"proteins": 2, "variants": 19 * 43, "multi_mutants": 0}
    compare = summary["compare_with"]
    student_scores = [float(r["score"]) for r in rows]
    teacher_scores = [float(r["teacher_score"]) for r in rows]
    from pepemb.fidelity import spearman

    assert compare["spearman"] == pytest.approx(spearman(np.array(student_scores), np.array(teacher_scores)), abs=1e-3)
    assert compare["speedup"] > 0 and len(summary["heatmaps"]) == 2
    for path in summary["heatmaps"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
