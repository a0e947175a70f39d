"""Masked-LM quality of a student, and of its teacher, on held-out sequences under fixed masks:
the sums over masked positions and the metrics of evaluate.py's report."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import data
from architecture import STANDARD_RESIDUES
from data import MaskedBatches
from losses import distillation_loss


@torch.inference_mode()
def masked_statistics(student, teacher, batches: MaskedBatches, device) -> dict:
    """Sums over every masked position: cross-entropies, KL(teacher || student) at T = 1,
    agreements, and per true-residue id the number of positions and of correct predictions."""
    vocab_size = student.config.vocab_size
    sums = {"n": 0, "ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "agree": 0}
    per_id = {k: torch.zeros(vocab_size, dtype=torch.long) for k in ("count", "student", "teacher")}
    for i in range(len(batches)):
        batch = {k: v.to(device) for k, v in batches[i].items()}
        labels = batch["labels"]
        masked = labels != data.IGNORE_INDEX
        truth = labels[masked]
        s_logits = student(batch["input_ids"], batch["attention_mask"])["logits"].float()
        s_pred = s_logits[masked].argmax(-1)
        sums["n"] += len(truth)
        sums["ce"] += F.cross_entropy(s_logits[masked], truth, reduction="sum").item()
        per_id["count"] += torch.bincount(truth, minlength=vocab_size).cpu()
        per_id["student"] += torch.bincount(truth[s_pred == truth], minlength=vocab_size).cpu()
        if teacher is None:
            continue
        t_logits = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        t_pred = t_logits[masked].argmax(-1)
        sums["teacher_ce"] += F.cross_entropy(t_logits[masked], truth, reduction="sum").item()
        kl = distillation_loss(s_logits, t_logits, labels, batch["attention_mask"], temperature=1.0,
                               distill_weight=1.0, task_weight=0.0)["kl"]
        sums["kl"] += kl.item() * len(truth)  # the loss is a mean over this batch's masked positions
        sums["agree"] += int((s_pred == t_pred).sum())
        per_id["teacher"] += torch.bincount(truth[t_pred == truth], minlength=vocab_size).cpu()
    return {**sums, "per_id": per_id, "has_teacher": teacher is not None}


def residue_counts(batches: list[dict], tokenizer) -> torch.Tensor:
    """Occurrences of each token id among the residues evaluated (after cropping)."""
    specials = torch.tensor(tokenizer.special_ids)
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for batch in batches:
        ids = batch["input_ids"]
        counts += torch.bincount(ids[~torch.isin(ids, specials)], minlength=len(tokenizer))
    return counts


def build_report(stats: dict, residues: torch.Tensor, tokenizer, speed: dict | None) -> dict:
    n, has_teacher = stats["n"], stats["has_teacher"]
    per_id = {k: v.tolist() for k, v in stats["per_id"].items()}

    def lm_metrics(ce_sum, correct):
        ce = ce_sum / n
        return {"masked_acc": correct / n, "perplexity": math.exp(min(ce, 50.0)), "cross_entropy": ce}

    # The always-predict-one-residue baseline: the residue most frequent in the evaluated
    # sequences, scored on the same masked positions.
    common = int(residues.argmax())
    metrics = {
        "student": lm_metrics(stats["ce"], sum(per_id["student"])),
        "teacher": lm_metrics(stats["teacher_ce"], sum(per_id["teacher"])) if has_teacher else None,
        "agreement": stats["agree"] / n if has_teacher else None,
        "kl_teacher_student": stats["kl"] / n if has_teacher else None,
        "baseline": {"residue": tokenizer.vocab[common], "frequency": int(residues[common]) / int(residues.sum()),
                     "masked_acc": per_id["count"][common] / n}}

    order = sorted((i for i, c in enumerate(per_id["count"]) if c),
                   key=lambda i: (-per_id["count"][i], tokenizer.vocab[i]))
    per_residue = {}
    for i in order:
        count = per_id["count"][i]
        per_residue[tokenizer.vocab[i]] = {
            "masked_count": count, "frequency": int(residues[i]) / int(residues.sum()),
            "student_correct": per_id["student"][i], "student_acc": per_id["student"][i] / count,
            "teacher_correct": per_id["teacher"][i] if has_teacher else None,
            "teacher_acc": per_id["teacher"][i] / count if has_teacher else None}
    counts = {"masked_tokens": n, "residues": int(residues.sum()),
              "nonstandard_masked": sum(c for i, c in enumerate(per_id["count"])
                                        if c and tokenizer.vocab[i] not in STANDARD_RESIDUES)}
    return {"metrics": metrics, "counts": counts, "per_residue": per_residue, "speed": speed}

