"""The distillation loss (KL to the teacher + masked-LM cross-entropy, and on request a hidden
cosine, a teacher-space embedding, log-likelihood-ratio and attention-relation term) and the
counts behind masked accuracy and agreement."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pepemb import data
from pepemb.relations import relation_loss

# What the training log sums between two records (over all ranks when there are several).
WINDOW_SUMS = ("tokens", "seqs", "masked", "loss", "kl", "ce", "cos", "emb", "llr", "rel", "correct", "agree")
TERMS = ("loss", "kl", "ce", "cos", "emb", "llr", "rel")


@dataclass(frozen=True)
class LossWeights:
    """The weight of each loss term, the KL term's softmax temperature and the relation term's
    number of relation heads (distill.py's loss flags)."""

    temperature: float
    distill_weight: float
    task_weight: float
    hidden_weight: float = 0.0
    embedding_weight: float = 0.0
    llr_weight: float = 0.0
    relation_weight: float = 0.0
    relation_heads: int = 8


def llr_loss(student_logits, teacher_logits, labels, residue_ids: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the log-likelihood ratios log p(a) - log p(wt) of student and
    teacher, over the masked positions whose true residue wt is one of `residue_ids` (the 20
    standard residues' token ids) and over those 20 residues a. A log-ratio is a difference of
    logits (the normalisers cancel), at T = 1 as zero-shot scoring reads it."""
    scored = (labels != -100) & torch.isin(labels, residue_ids)
    wild_type = labels[scored][:, None]
    ratios = []
    for logits in (student_logits, teacher_logits):
        z = logits[scored].float()
        ratios.append(z[:, residue_ids] - z.gather(1, wild_type))
    squared = (ratios[0] - ratios[1]).pow(2).sum()
    return squared / (scored.sum() * len(residue_ids)).clamp(min=1)


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
    llr_weight=0.0,
    residue_ids=None,
    relation_weight=0.0,
    student_qkv=None,
    teacher_qkv=None,
    relation_heads=8,
):
    """Weighted KD + MLM (+ hidden cosine, + teacher-space embedding, + log-likelihood ratios,
    + attention relations) loss; each term averaged per token (or protein) it covers.

    kl  = T^2 * mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), at temperature T
    ce  = mean over masked positions of -log p_s(true residue)
    cos = mean over non-pad positions of 1 - cos(student_hidden, teacher_hidden)
    emb = mean over proteins and dimensions of (student_embedding - teacher_embedding)^2 /
          embedding_scale: with the scale the variance of the teacher's embeddings, 1 - R^2 of
          the mapped student embedding as a prediction of the teacher's
    llr = llr_loss: squared error of the 20 log-ratios log p(a) - log p(wt) at masked positions
    rel = relations.relation_loss: KL of the q-q, k-k and v-v relations of one layer each, from
          the student's and the teacher's captured projections (student_qkv, teacher_qkv)
    Returns a dict of 0-d tensors: loss, kl, ce, cos, emb, llr, rel. teacher_logits None
    (masked-LM only): kl = 0.
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
    llr = torch.zeros((), device=student_logits.device)
    if llr_weight > 0:
        llr = llr_loss(student_logits, teacher_logits, labels, residue_ids)
        loss = loss + llr_weight * llr
    rel = torch.zeros((), device=student_logits.device)
    if relation_weight > 0 and teacher_qkv is not None:  # validation replays logits only: no relations
        rel = relation_loss(student_qkv, teacher_qkv, attention_mask, relation_heads)
        loss = loss + relation_weight * rel
    terms = {"loss": loss, "kl": kl, "ce": ce, "cos": cos, "emb": emb, "llr": llr, "rel": rel}
    return {k: v if k == "loss" else v.detach() for k, v in terms.items()}


def loss_terms(
    student_out,
    hidden_proj,
    t_logits,
    t_hidden,
    batch,
    weights: LossWeights,
    distill_positions,
    t_embedding=None,
    residue_ids=None,
    student_qkv=None,
    teacher_qkv=None,
):
    """distillation_loss with these weights, projecting the student's hidden states if used;
    t_embedding: the teacher targets' "embeddings" and "embedding_scale" (--embedding_weight);
    residue_ids (--llr_weight) and the captured projections (--relation_weight)."""
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
        llr_weight=weights.llr_weight,
        residue_ids=residue_ids,
        relation_weight=weights.relation_weight,
        student_qkv=student_qkv,
        teacher_qkv=teacher_qkv,
        relation_heads=weights.relation_heads,
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
