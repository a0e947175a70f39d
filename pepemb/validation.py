"""Validation during training: loss terms, masked accuracy and agreement with the teacher on
the fixed validation masks, summed over ranks."""

from __future__ import annotations

import math

import torch

from pepemb import data
from pepemb.data import MaskedBatches
from pepemb.devices import autocast
from pepemb.distributed import SINGLE_PROCESS, World, all_reduce
from pepemb.losses import TERMS, LossWeights, loss_terms, masked_metrics
from pepemb.teacher_targets import TeacherTargets


@torch.no_grad()
def validate(
    student,
    hidden_proj,
    teacher_outputs,
    val_set: MaskedBatches,
    weights: LossWeights,
    device,
    autocast_dtype,
    world: World = SINGLE_PROCESS,
    residue_ids=None,
) -> dict:
    """Loss terms, masked accuracy (student and teacher), top-1 agreement with the teacher and
    perplexity on the validation split with fixed masks. `teacher_outputs(i, batch)` returns the
    teacher's (logits, last hidden states, targets with the embeddings) for validation batch i. Each rank evaluates every
    world.size-th batch; the sums are all-reduced, so that every rank returns the same metrics.
    residue_ids: for the log-ratio term (--llr_weight); the relation term is not validated (the
    teacher's validation outputs are logits replayed, without its attention projections)."""
    was_training = student.training
    student.eval()
    sums = dict.fromkeys([*TERMS, "n", "student_correct", "teacher_correct", "agree"], 0.0)
    for i in range(world.rank, len(val_set), world.size):
        batch = {k: v.to(device) for k, v in val_set[i].items()}
        with autocast(device, autocast_dtype):
            out = student(
                batch["input_ids"],
                batch["attention_mask"],
                output_hidden_states=hidden_proj is not None,
                output_embedding=student.teacher_map is not None,
            )
        t_logits, t_hidden, t_embedding = teacher_outputs(i, batch)
        terms = loss_terms(
            out,
            hidden_proj,
            t_logits,
            t_hidden,
            batch,
            weights,
            distill_positions="masked",
            t_embedding=t_embedding,
            residue_ids=residue_ids,
        )
        counts = masked_metrics(out["logits"], t_logits, batch["labels"])
        for k in TERMS:
            sums[k] += float(terms[k]) * counts["n"]
        for k in ("n", "student_correct", "teacher_correct", "agree"):
            sums[k] += counts[k]
    student.train(was_training)
    sums = dict(zip(sums, all_reduce(list(sums.values()), world)))
    n = max(sums["n"], 1)
    metrics = {k: sums[k] / n for k in TERMS}
    metrics.update(
        masked_acc=sums["student_correct"] / n,
        teacher_masked_acc=sums["teacher_correct"] / n,
        agreement=sums["agree"] / n,
        perplexity=math.exp(min(metrics["ce"], 50.0)),
        masked_tokens=int(sums["n"]),
    )
    return metrics


class ValidationTeacher:
    """The teacher's (logits, last hidden states, embeddings) of each validation batch: its masks
    are fixed, so they are computed (or read from the cache) once and kept."""

    def __init__(self, targets: TeacherTargets):
        self.targets = targets
        self.outputs = {}

    def __call__(self, i: int, batch: dict) -> tuple:
        if i not in self.outputs:
            t = self.targets(batch, data.VALIDATION_VARIANT)
            self.outputs[i] = (t["logits"], t.get("hidden_states"), t)
        return self.outputs[i]
