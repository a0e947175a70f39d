"""--llr_weight and --relation_weight: each term against a hand computation on tiny tensors, the
hooks that feed the relation term against the modules' own outputs, and both in a distill.py run."""

import json
import math

import pytest
import torch

import distill
from architecture import Student, StudentConfig
from conftest import tiny_args
from pepemb.cli import UserError
from pepemb.losses import distillation_loss, llr_loss
from pepemb.relations import relation_loss, student_capture, teacher_capture


def test_llr_matches_a_hand_computation_and_skips_what_it_should():
    # vocabulary of 6; "residues" are tokens 1, 2, 4; position 0 masked with wt 2, position 1
    # masked with wt 5 (not a residue: skipped), position 2 not masked
    residue_ids = torch.tensor([1, 2, 4])
    s = torch.tensor([[[0.0, 1.0, 2.0, 9.0, 0.5, 3.0], [1.0] * 6, [5.0] * 6]])
    t = torch.tensor([[[0.0, 2.0, 1.0, -9.0, 1.5, 0.0], [0.0] * 6, [0.0] * 6]])
    labels = torch.tensor([[2, 5, -100]])
    # student log-ratios at residues (1, 2, 4) against wt 2: (-1, 0, -1.5); teacher's: (1, 0, 0.5)
    hand = ((-1 - 1) ** 2 + 0 + (-1.5 - 0.5) ** 2) / 3
    assert llr_loss(s, t, labels, residue_ids).item() == pytest.approx(hand)
    # a log-ratio is a difference of log-probabilities: normalising (or shifting) the logits changes nothing
    assert llr_loss(s.log_softmax(-1), t + 7.0, labels, residue_ids).item() == pytest.approx(hand, rel=1e-6)
    out = distillation_loss(
        s, t, labels, torch.ones(1, 3), temperature=2.0, distill_weight=0.0, task_weight=0.0,
        llr_weight=0.5, residue_ids=residue_ids,
    )  # fmt: skip
    assert out["llr"].item() == pytest.approx(hand) and out["loss"].item() == pytest.approx(0.5 * hand)
    # no scored position: 0, not NaN
    assert llr_loss(s, t, torch.tensor([[5, -100, -100]]), residue_ids).item() == 0.0


def relations_by_hand(x: torch.Tensor, real: list[bool], heads: int) -> list:
    """[head][query][key] probabilities of one sequence x [L, D], by loops."""
    width = x.shape[1] // heads
    rows = []
    for h in range(heads):
        part = x[:, h * width : (h + 1) * width].tolist()
        head = []
        for i in range(len(part)):
            scores = [sum(a * b for a, b in zip(part[i], part[j])) / math.sqrt(width) for j in range(len(part))]
            z = sum(math.exp(v) for v, r in zip(scores, real) if r)
            head.append([math.exp(v) / z if r else 0.0 for v, r in zip(scores, real)])
        rows.append(head)
    return rows


def test_relation_loss_matches_a_hand_computation_across_widths():
    torch.manual_seed(0)
    real = [True, True, True, False]  # the last position is padding: neither a query nor a key
    student = tuple(torch.randn(1, 4, 4) for _ in range(3))  # width 4 ...
    teacher = tuple(torch.randn(1, 4, 6) for _ in range(3))  # ... against 6, two relation heads each
    hand = 0.0
    for s, t in zip(student, teacher):
        rs, rt = relations_by_hand(s[0], real, 2), relations_by_hand(t[0], real, 2)
        kls = [
            sum(p * math.log(p / q) for p, q in zip(rt[h][i], rs[h][i]) if p > 0)
            for h in range(2)
            for i in range(3)  # real queries only
        ]
        hand += sum(kls) / len(kls)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert relation_loss(student, teacher, mask, heads=2).item() == pytest.approx(hand, rel=1e-5)
    assert relation_loss(teacher, teacher, mask, heads=2).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        relation_loss(student, teacher, mask, heads=3)


def test_captures_give_the_layers_own_projections(protbert_teacher_dir):
    from pepemb.teacher import load_teacher

    teacher = load_teacher(str(protbert_teacher_dir), device=torch.device("cpu"))
    batch = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    capture = teacher_capture(teacher.model, -1)
    hidden = teacher.model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True).hidden_states
    q, k, v = capture.take()
    last = teacher.model.bert.encoder.layer[-1].attention.self
    for got, module in zip((q, k, v), (last.query, last.key, last.value)):
        assert torch.equal(got, module(hidden[-2]))  # the input of the last layer, projected
    capture.remove()

    config = StudentConfig.from_tokenizer(teacher.tokenizer, d_model=32, num_heads=2, num_layers=2, dropout=0.0)
    student = Student(config)
    capture = student_capture(student, 0)
    out = student(batch[0], batch[1], output_hidden_states=True)
    q, k, v = capture.take()
    with pytest.raises(RuntimeError, match="no forward pass"):
        capture.take()  # taken once: a stale capture is never reused
    capture.remove()
    fused = student.blocks[0].attn.qkv(student.blocks[0].attn_norm(out["hidden_states"][0]))
    assert torch.equal(torch.cat([q, k, v], -1), fused) and q.shape == (2, 5, 32)


def test_both_terms_train_in_a_distill_run(protbert_teacher_dir, small_fasta, tmp_path):
    out = tmp_path / "run"
    flags = ["--num_epochs", "1", "--max_steps", "3", "--log_every", "1", "--llr_weight", "0.5"]
    flags += ["--relation_weight", "1", "--relation_layers", "-1", "0", "--relation_heads", "4"]
    distill.main(tiny_args(protbert_teacher_dir, small_fasta, out, *flags))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert len(train) == 3 and all(r["llr"] > 0 and r["rel"] > 0 for r in train)
    # the loss is the weighted sum of its terms (dropout aside, each record is one step)
    r = train[0]
    assert r["loss"] == pytest.approx(0.9 * r["kl"] + 0.1 * r["ce"] + 0.5 * r["llr"] + r["rel"], rel=1e-4)
    assert all(r["llr"] > 0 and r["rel"] == 0 for r in val)  # validation replays logits, not projections


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--relation_weight", "1", "--teacher_cache", "{tmp}/cache"], "needs the live teacher"),
        (["--relation_weight", "1", "--relation_heads", "3"], "does not divide --d_model"),
        (["--relation_weight", "1", "--relation_layers", "0", "5"], "the student has 2 layers"),
        (["--relation_weight", "1", "--relation_layers", "-3", "0"], "the teacher has 2 layers"),
        (["--llr_weight", "-1"], "must not be negative"),
    ],
)
def test_bad_relation_and_llr_flags_are_user_errors(flags, message, protbert_teacher_dir, small_fasta, tmp_path):
    flags = [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(UserError, match=message):
        distill.main(tiny_args(protbert_teacher_dir, small_fasta, tmp_path / "run", *flags))


def test_the_esm_layout_is_captured_at_the_chosen_layer(esm_teacher_dir):
    from pepemb.teacher import load_teacher

    teacher = load_teacher(str(esm_teacher_dir), device=torch.device("cpu"))
    seen = {}
    first = teacher.model.esm.encoder.layer[0].attention.self
    for name in ("query", "key", "value"):
        getattr(first, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    capture = teacher_capture(teacher.model, -2)  # the first of two layers
    teacher.model(input_ids=torch.tensor([[0, 5, 6, 7, 2]]))
    assert all(torch.equal(got, seen[name]) for got, name in zip(capture.take(), ("query", "key", "value")))
