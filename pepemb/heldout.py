"""Masked-LM quality of a student, and of its teacher, on held-out sequences under fixed masks:
the sums over masked positions and the metrics of evaluate.py's report."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from architecture import STANDARD_RESIDUES, mean_pooled
from pepemb import data, fidelity
from pepemb.data import MaskedBatches, Masking
from pepemb.losses import distillation_loss


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
        kl = distillation_loss(
            s_logits, t_logits, labels, batch["attention_mask"], temperature=1.0, distill_weight=1.0, task_weight=0.0
        )["kl"]
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
        "baseline": {
            "residue": tokenizer.vocab[common],
            "frequency": int(residues[common]) / int(residues.sum()),
            "masked_acc": per_id["count"][common] / n,
        },
    }

    order = sorted(
        (i for i, c in enumerate(per_id["count"]) if c), key=lambda i: (-per_id["count"][i], tokenizer.vocab[i])
    )
    per_residue = {}
    for i in order:
        count = per_id["count"][i]
        per_residue[tokenizer.vocab[i]] = {
            "masked_count": count,
            "frequency": int(residues[i]) / int(residues.sum()),
            "student_correct": per_id["student"][i],
            "student_acc": per_id["student"][i] / count,
            "teacher_correct": per_id["teacher"][i] if has_teacher else None,
            "teacher_acc": per_id["teacher"][i] / count if has_teacher else None,
        }
    counts = {
        "masked_tokens": n,
        "residues": int(residues.sum()),
        "nonstandard_masked": sum(
            c for i, c in enumerate(per_id["count"]) if c and tokenizer.vocab[i] not in STANDARD_RESIDUES
        ),
    }
    return {"metrics": metrics, "counts": counts, "per_residue": per_residue, "speed": speed}


# --------------------------------------------------------------------------------------------
# Fidelity beyond masked accuracy (pepemb.fidelity): mutation effects, CKA, embedding neighbours
# --------------------------------------------------------------------------------------------


def sample_proteins(count: int, limit: int | None, seed: int) -> list[int]:
    """`limit` indices of `count` items drawn without replacement by `seed`, in order (all when
    limit is None or not below count): the same held-out set and seed, the same proteins."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=limit, replace=False).tolist())


# evaluate.py's defaults for the fidelity measures (the benchmarks score with the same ones): 150
# proteins x 8 sites keep mutation effects to a minute or two on CPU; 1,000 proteins for embeddings.
MUTATION_PROTEINS, MUTATION_POSITIONS, EMBEDDING_PROTEINS = 150, 8, 1000


class MutationProbe:
    """Zero-shot mutation effects (ESM-1v masked marginals) on `positions` random sites of
    `proteins` random sequences, every 19 substitutions each: score any model with `scores`, then
    compare with the teacher's (`agreement`), or the residue-frequency baseline's, which knows no
    context (what chance-level knowledge scores)."""

    def __init__(
        self,
        sequences: list[str],
        tokenizer,
        *,
        proteins: int,
        positions: int,
        seed: int,
        max_seq_len: int,
        max_tokens: int = 8192,
    ):
        self.sequences = [sequences[i] for i in sample_proteins(len(sequences), proteins, seed)]
        self.sites = fidelity.sample_mutation_sites(self.sequences, positions, seed)
        self.wild_types = fidelity.wild_type_columns(self.sequences, self.sites)
        self.tokenizer, self.max_seq_len, self.max_tokens = tokenizer, max_seq_len, max_tokens
        self.about = {"proteins": len(self.sequences), "positions_per_protein": positions, "seed": seed}
        frequencies = [sum(s.upper().count(a) for s in sequences) for a in STANDARD_RESIDUES]
        self.baseline = fidelity.frequency_baseline_scores(np.maximum(frequencies, 1), self.sites, self.wild_types)

    def scores(self, model, device) -> np.ndarray:
        """[sites, 20] masked-marginal scores of a student or teacher (anything returning logits)."""
        return fidelity.masked_marginals(
            model,
            self.tokenizer,
            self.sequences,
            self.sites,
            max_tokens=self.max_tokens,
            max_len=self.max_seq_len,
            device=device,
        )

    def agreement(self, scores: np.ndarray, teacher_scores: np.ndarray) -> dict:
        return fidelity.mutation_effect_agreement(scores, teacher_scores, self.sites, self.wild_types)

    def report(self, scores: np.ndarray, teacher_scores: np.ndarray) -> dict:
        return {
            "student": self.agreement(scores, teacher_scores),
            "baseline": self.agreement(self.baseline, teacher_scores),
            **self.about,
        }


@torch.inference_mode()
def last_hidden_states(model, batches: list[dict], device) -> dict:
    """A student's or a teacher's last hidden states over unmasked batches: "pooled", the mean
    over each protein's residues [proteins, H], and "tokens", every residue token's [tokens, H]."""
    pooled, tokens = [], []
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model(ids, mask, output_hidden_states=True)["hidden_states"]
        hidden = (out[-1] if isinstance(out, tuple) else out).float()  # a student returns every layer's
        residues = mask.bool().clone()
        residues[:, 0] = False
        residues[torch.arange(len(ids)), mask.sum(1) - 1] = False  # start and end tokens
        pooled.append(mean_pooled(hidden, mask).cpu())
        tokens.append(hidden[residues].cpu())
    return {"pooled": torch.cat(pooled), "tokens": torch.cat(tokens)}


def representation_measures(
    student_states: dict, teacher_states: dict, *, knn_k: int = 10, max_tokens: int = 20000, seed: int = 0
) -> dict:
    """Linear CKA of the student's and the teacher's last hidden states over residue tokens (at
    most max_tokens, drawn by seed), and the k-NN overlap of their mean-pooled protein embeddings."""
    rows = sample_proteins(len(student_states["tokens"]), max_tokens, seed)
    n = len(student_states["pooled"])
    return {
        "cka": fidelity.linear_cka(student_states["tokens"][rows], teacher_states["tokens"][rows]),
        "cka_tokens": len(rows),
        "knn_k": min(knn_k, max(n - 1, 1)),
        "knn_proteins": n,
        "knn_overlap": fidelity.knn_overlap(teacher_states["pooled"], student_states["pooled"], k=knn_k)
        if n > 1
        else None,
        "knn_chance": fidelity.knn_overlap_chance(n, knn_k) if n > 1 else None,
    }


def teacher_space_measures(mapped: torch.Tensor, teacher_pooled: torch.Tensor, *, knn_k: int = 10) -> dict:
    """How well per-protein embeddings mapped into the teacher's space [proteins, H] stand in
    for the teacher's own: k-NN overlap, the cosine of each protein's mapped and true embedding
    after subtracting the teacher's mean embedding (raw cosines of mean-pooled embeddings are all
    near 1 and say little; the raw one is reported beside it), and R^2."""
    mapped, truth = fidelity.as_float64(mapped), fidelity.as_float64(teacher_pooled)
    mean = truth.mean(0)
    residual = ((mapped - truth) ** 2).sum()
    return {
        "knn_overlap": fidelity.knn_overlap(truth, mapped, k=knn_k) if len(truth) > 1 else None,
        "centred_cosine": mean_cosine(mapped - mean, truth - mean),
        "raw_cosine": mean_cosine(mapped, truth),
        "r2": float(1 - residual / ((truth - mean) ** 2).sum()) if len(truth) > 1 else None,
        "proteins": len(truth),
    }


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of the cosine between x's and y's rows."""
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean((x * y).sum(1) / np.maximum(norms, 1e-12)))


def fidelity_measures(
    student,
    teacher,
    sequences: list[str],
    tokenizer,
    batching: Masking,
    device,
    *,
    mutation_proteins: int,
    mutation_positions: int,
    embedding_proteins: int,
) -> dict:
    """Mutation-effect agreement (MutationProbe), CKA and 10-NN overlap of the last hidden states
    and, for a student with a teacher map, teacher-space measures; with their time in seconds.
    `batching` gives max_seq_len, the seed that draws proteins and sites, and the batch sizes;
    a count of 0 skips its measure."""
    max_seq_len, seed = batching.max_seq_len, batching.seed
    start = time.perf_counter()
    measures = {}
    if mutation_proteins and mutation_positions:
        probe = MutationProbe(
            sequences,
            tokenizer,
            proteins=mutation_proteins,
            positions=mutation_positions,
            seed=seed,
            max_seq_len=max_seq_len,
        )
        measures["mutation_effects"] = probe.report(probe.scores(student, device), probe.scores(teacher, device))
    if embedding_proteins:
        chosen = [sequences[i] for i in sample_proteins(len(sequences), embedding_proteins, seed)]
        batches = MaskedBatches(chosen, tokenizer, batching, epoch=0, train=False).unmasked()
        student_states, teacher_states = (
            last_hidden_states(student, batches, device),
            last_hidden_states(teacher, batches, device),
        )
        measures["representations"] = representation_measures(student_states, teacher_states, seed=seed)
        if student.teacher_map is not None:  # distilled with --embedding_weight: its teacher-space embeddings
            with torch.no_grad():
                mapped = student.teacher_map(student_states["pooled"].to(device)).cpu()
            measures["teacher_space"] = teacher_space_measures(mapped, teacher_states["pooled"])
    measures["seconds"] = time.perf_counter() - start
    return measures
