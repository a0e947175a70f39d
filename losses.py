"""The distillation loss (KL to the teacher + masked-LM cross-entropy + hidden cosine) and the
counts behind masked accuracy and agreement."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import data

# What the training log sums between two records (over all ranks when there are several).


# What the training log sums between two records (over all ranks when there are several).
WINDOW_SUMS = ("tokens", "seqs", "masked", "loss", "kl", "ce", "cos", "correct", "agree")


def distillation_loss(student_logits, teacher_logits, labels, attention_mask, *, temperature,
                      distill_weight, task_weight, distill_positions="masked",
                      student_hidden=None, teacher_hidden=None, hidden_weight=0.0):
    """Weighted KD + MLM (+ hidden cosine) loss; each term averaged per token it covers.

    kl  = T^2 * mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), at temperature T
    ce  = mean over masked positions of -log p_s(true residue)
    cos = mean over non-pad positions of 1 - cos(student_hidden, teacher_hidden)
    Returns a dict of 0-d tensors: loss, kl, ce, cos. teacher_logits None (masked-LM only): kl = 0.
    """
    masked = labels != -100
    kl = torch.zeros((), device=student_logits.device)
    if teacher_logits is not None:  # None: plain masked-LM training, no teacher in the loss
        kl_positions = data.kl_positions(labels, attention_mask, distill_positions)
        log_p_s = F.log_softmax(student_logits[kl_positions].float() / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits[kl_positions].float() / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(student_logits[masked].float(), labels[masked])
    loss = distill_weight * kl + task_weight * ce
    cos = torch.zeros((), device=student_logits.device)
    if hidden_weight > 0:
        real = attention_mask.bool()
        cos = (1 - F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1)).mean()
        loss = loss + hidden_weight * cos
    return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), "cos": cos.detach()}


def loss_terms(student_out, hidden_proj, t_logits, t_hidden, batch, args, distill_positions):
    """distillation_loss with this run's weights, projecting the student's hidden states if used."""
    s_hidden = hidden_proj(student_out["hidden_states"][-1]) if hidden_proj is not None else None
    return distillation_loss(student_out["logits"], t_logits, batch["labels"], batch["attention_mask"],
                             temperature=args.temperature, distill_weight=args.distill_weight,
                             task_weight=args.task_weight, distill_positions=distill_positions,
                             student_hidden=s_hidden, teacher_hidden=t_hidden,
                             hidden_weight=args.hidden_weight)


def masked_metrics(student_logits, teacher_logits, labels) -> dict:
    """Counts at masked positions: student/teacher correct, agreement, number of positions.
    Without teacher logits the teacher counts are 0."""
    masked = labels != -100
    s_pred = student_logits[masked].argmax(-1)
    truth = labels[masked]
    counts = {"n": int(masked.sum()), "student_correct": int((s_pred == truth).sum()),
              "teacher_correct": 0, "agree": 0}
    if teacher_logits is not None:
        t_pred = teacher_logits[masked].argmax(-1)
        counts.update(teacher_correct=int((t_pred == truth).sum()), agree=int((s_pred == t_pred).sum()))
    return counts


def add_to_window(window: dict, batch: dict, counts: dict, terms: dict) -> None:
    """Add one micro-batch to the running sums behind the next metrics.jsonl train record."""
    window["tokens"] += int(batch["attention_mask"].sum())
    window["seqs"] += batch["input_ids"].shape[0]
    window["masked"] += counts["n"]
    window["correct"] += counts["student_correct"]
    window["agree"] += counts["agree"]
    for k in ("loss", "kl", "ce", "cos"):
        window[k] += float(terms[k].detach()) * counts["n"]
