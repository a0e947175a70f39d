"""distill.distillation_loss against hand computations on tiny tensors."""

import math

import pytest
import torch

from pepemb.losses import distillation_loss, masked_metrics


def one_masked_position(student_row, teacher_row, label):
    """[1, 3, V] logits where only position 1 is masked (label), positions 0 and 2 are not."""
    student = torch.zeros(1, 3, len(student_row))
    teacher = torch.zeros(1, 3, len(teacher_row))
    student[0, 1] = torch.tensor(student_row)
    teacher[0, 1] = torch.tensor(teacher_row)
    labels = torch.tensor([[-100, label, -100]])
    return student, teacher, labels, torch.ones(1, 3, dtype=torch.long)


def test_kl_and_ce_match_hand_computation_at_t1():
    # student uniform over 3 tokens; teacher p = (1/2, 1/4, 1/4)
    s, t, labels, mask = one_masked_position([0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], label=0)
    out = distillation_loss(s, t, labels, mask, temperature=1.0, distill_weight=0.5, task_weight=0.5)
    kl = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)  # = 0.5 ln 1.125
    ce = math.log(3)
    assert out["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert out["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * kl + 0.5 * ce, abs=1e-6)


def test_temperature_softens_teacher_and_scales_by_t_squared():
    s, t, labels, mask = one_masked_position([0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], label=1)
    out = distillation_loss(s, t, labels, mask, temperature=2.0, distill_weight=0.9, task_weight=0.1)
    # at T=2 the teacher's logits halve: p proportional to (sqrt 2, 1, 1)
    z = math.sqrt(2) + 2
    p = [math.sqrt(2) / z, 1 / z, 1 / z]
    kl = 4 * sum(pi * math.log(pi * 3) for pi in p)
    assert out["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.9 * kl + 0.1 * math.log(3), abs=1e-6)


def test_identical_logits_give_zero_kl_and_all_positions_mode_counts_every_real_token():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[1, 1] = 3, 4
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    same = distillation_loss(
        logits,
        logits.clone(),
        labels,
        mask,
        temperature=2.0,
        distill_weight=1.0,
        task_weight=0.0,
        distill_positions="all",
    )
    assert same["kl"].item() == pytest.approx(0.0, abs=1e-6)

    # 'all' averages the KL over the 8 real positions; only position (0, 0) differs
    teacher = logits.clone()
    teacher[0, 0] += torch.arange(7.0)
    one = distillation_loss(
        logits[:, :1],
        teacher[:, :1],
        torch.tensor([[0], [-100]]),
        mask[:, :1],
        temperature=1.0,
        distill_weight=1.0,
        task_weight=0.0,
    )["kl"]
    all_pos = distillation_loss(
        logits, teacher, labels, mask, temperature=1.0, distill_weight=1.0, task_weight=0.0, distill_positions="all"
    )["kl"]
    assert all_pos.item() == pytest.approx(one.item() / 8, rel=1e-5)


def test_hidden_cosine_term():
    s, t, labels, mask = one_masked_position([0.0, 0.0], [0.0, 0.0], label=0)
    student_hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    teacher_hidden = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]])  # cos = 1, -1, 1
    out = distillation_loss(
        s,
        t,
        labels,
        mask,
        temperature=1.0,
        distill_weight=0.0,
        task_weight=1.0,
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        hidden_weight=0.5,
    )
    assert out["cos"].item() == pytest.approx((0 + 2 + 0) / 3)
    assert out["loss"].item() == pytest.approx(math.log(2) + 0.5 * 2 / 3, abs=1e-6)


def test_masked_metrics_counts():
    student = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])  # predicts 1, 0, 0
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [5.0, 0.0]]])  # predicts 1, 1, 0
    labels = torch.tensor([[1, 1, -100]])
    assert masked_metrics(student, teacher, labels) == {"n": 2, "student_correct": 1, "teacher_correct": 2, "agree": 1}
