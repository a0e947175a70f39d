"""The distillation loss (KL to the teacher + masked-LM cross-entropy + hidden cosine) and the
counts behind masked accuracy and agreement."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pepemb import data

# What the training log sums between two records (over all ranks when there are several).
WINDOW_SUMS = ("tokens", "seqs", "masked", "loss", "kl", "ce", "cos", "emb", "correct", "agree")
TERMS = ("loss", "kl", "ce", "cos", "emb")


@dataclass(frozen=True)
class LossWeights:
    """The weight of each loss term and the KL term's softmax temperature (distill.py's loss flags)."""

    temperature: float
    distill_weight: float
    task_weight: float
    hidden_weight: float = 0.0
    embedding_weight: float = 0.0


def distillation_loss(
    student_logits,
    teacher_logits,
    labels,
    attention_mask,
    *,
    temperature,
    distill_weight,
    task_weight,
    distill_positions="masked",
    student_hidden=None,
    teacher_hidden=None,
    hidden_weight=0.0,
    student_embedding=None,
    teacher_embedding=None,
    embedding_weight=0.0,
    embedding_scale=1.0,
):
    """Weighted KD + MLM (+ hidden cosine, + teacher-space embedding) loss; each term averaged
    per token (or protein) it covers.

    kl  = T^2 * mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), at temperature T
    ce  = mean over masked positions of -log p_s(true residue)
    cos = mean over non-pad positions of 1 - cos(student_hidden, teacher_hidden)
    emb = mean over proteins and dimensions of (student_embedding - teacher_embedding)^2 /
          embedding_scale: with the scale the variance of the teacher's embeddings, 1 - R^2 of
          the mapped student embedding as a prediction of the teacher's
    Returns a dict of 0-d tensors: loss, kl, ce, cos, emb. teacher_logits None (masked-LM only): kl = 0.
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
    emb = torch.zeros((), device=student_logits.device)
    if embedding_weight > 0:
        emb = (student_embedding.float() - teacher_embedding.float()).pow(2).mean() / embedding_scale
        loss = loss + embedding_weight * emb
    return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), "cos": cos.detach(), "emb": emb.detach()}


def loss_terms(
    student_out, hidden_proj, t_logits, t_hidden, batch, weights: LossWeights, distill_positions, t_embedding=None
):
    """distillation_loss with these weights, projecting the student's hidden states if used;
    t_embedding: the teacher targets' "embeddings" and "embedding_scale" (--embedding_weight)."""
    s_hidden = hidden_proj(student_out["hidden_states"][-1]) if hidden_proj is not None else None
    embedding_weight = weights.embedding_weight
    return distillation_loss(
        student_out["logits"],
        t_logits,
        batch["labels"],
        batch["attention_mask"],
        temperature=weights.temperature,
        distill_weight=weights.distill_weight,
        task_weight=weights.task_weight,
        distill_positions=distill_positions,
        student_hidden=s_hidden,
        teacher_hidden=t_hidden,
        hidden_weight=weights.hidden_weight,
        embedding_weight=embedding_weight,
        student_embedding=student_out.get("teacher_embedding"),
        teacher_embedding=t_embedding["embeddings"] if embedding_weight > 0 else None,
        embedding_scale=t_embedding["embedding_scale"] if embedding_weight > 0 else 1.0,
    )


def masked_metrics(student_logits, teacher_logits, labels) -> dict:
    """Counts at masked positions: student/teacher correct, agreement, number of positions.
    Without teacher logits the teacher counts are 0."""
    masked = labels != -100
    s_pred = student_logits[masked].argmax(-1)
    truth = labels[masked]
    counts = {"n": int(masked.sum()), "student_correct": int((s_pred == truth).sum()), "teacher_correct": 0, "agree": 0}
    if teacher_logits is not None:
        t_pred = teacher_logits[masked].argmax(-1)
        counts.update(teacher_correct=int((t_pred == truth).sum()), agree=int((s_pred == t_pred).sum()))
    return counts


def new_window() -> dict:
    """Empty running sums for the next metrics.jsonl train record, and when they started ("t0")."""
    return dict.fromkeys(WINDOW_SUMS, 0) | {"t0": time.perf_counter()}


def add_to_window(window: dict, batch: dict, counts: dict, terms: dict) -> None:
    """Add one micro-batch to the running sums behind the next metrics.jsonl train record."""
    window["tokens"] += int(batch["attention_mask"].sum())
    window["seqs"] += batch["input_ids"].shape[0]
    window["masked"] += counts["n"]
    window["correct"] += counts["student_correct"]
    window["agree"] += counts["agree"]
    for k in TERMS:
        window[k] += float(terms[k].detach()) * counts["n"]
