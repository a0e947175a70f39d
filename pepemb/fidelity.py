"""Fidelity of a student to its teacher beyond masked accuracy: mutation effects, representation
similarity, embedding neighbourhoods.

Everything here is a small pure function of arrays (numpy or torch in, numpy or floats out):

  - rank correlation: average_ranks, spearman,
  - representation similarity: linear_cka (Kornblith et al. 2019),
  - embedding neighbourhoods: knn_overlap, knn_overlap_chance,
  - zero-shot mutation effects (ESM-1v masked marginals): sample_mutation_sites, wild_type_columns,
    site_log_probs, masked_marginals, mutation_effect_agreement, frequency_baseline_scores.

Mutation scores are [n_sites, 20] arrays whose columns are architecture.STANDARD_RESIDUES in that
order; a site is a (protein index, 0-based residue position) pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from architecture import STANDARD_RESIDUES, ResidueTokenizer
from pepemb import data

Site = tuple[int, int]  # (protein index, 0-based position in its residue string)


# --------------------------------------------------------------------------------------------
# Rank correlation
# --------------------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (what Spearman's rho needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation; None when either side is constant (rho undefined)."""
    if len(x) < 2:
        return None
    rx, ry = average_ranks(np.asarray(x)), average_ranks(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else None


# --------------------------------------------------------------------------------------------
# Representation similarity and neighbourhoods
# --------------------------------------------------------------------------------------------


def as_float64(matrix) -> np.ndarray:
    """A torch tensor (any device, dtype, grad) or array-like as a float64 numpy array."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().to("cpu", torch.float64).numpy()
    return np.asarray(matrix, dtype=np.float64)


def _paired_matrices(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float64(x), as_float64(y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need two [n, d] matrices over the same n items, got {x.shape} and {y.shape}")
    return x, y


def linear_cka(x, y) -> float:
    """Linear CKA between representations x [n, d1] and y [n, d2] of the same n items.

    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X and Y: 1 for representations
    equal up to rotation and isotropic scaling, near 0 for unrelated ones. The widths may differ.
    NaN when either side is constant over the items (CKA undefined).
    """
    x, y = _paired_matrices(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    # The d x d products, not the n x n Gram matrices: cheaper whenever items outnumber widths.
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator) if denominator > 0 else math.nan


def _clipped_k(n: int, k: int) -> int:
    if n < 2:
        raise ValueError(f"neighbourhoods need at least 2 items, got {n}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return min(k, n - 1)


def _neighbour_mask(unit: np.ndarray, rows: slice, k: int) -> np.ndarray:
    """[rows, n] booleans: True at the k most cosine-similar other items of each row.

    Ties are broken towards the lower index (stable sort), so results are deterministic.
    """
    similarity = unit[rows] @ unit.T
    similarity[np.arange(similarity.shape[0]), np.arange(rows.start, rows.stop)] = -np.inf  # not itself
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    mask = np.zeros(similarity.shape, dtype=bool)
    np.put_along_axis(mask, nearest, True, axis=1)
    return mask


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)  # a zero row stays zero: similarity 0 to everything


def knn_overlap(reference, other, k: int = 10, chunk: int = 1024) -> float:
    """Mean over items of the fraction of an item's k nearest neighbours under `reference`
    [n, d1] that are also among its k nearest under `other` [n, d2] (cosine similarity, the
    item itself excluded). k is clipped to n - 1; knn_overlap_chance(n, k) is the value for
    unrelated embeddings. Rows are handled `chunk` at a time so memory stays chunk x n.
    """
    reference, other = _paired_matrices(reference, other)
    n = len(reference)
    k = _clipped_k(n, k)
    reference, other = _unit_rows(reference), _unit_rows(other)
    shared = 0
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        shared += int((_neighbour_mask(reference, rows, k) & _neighbour_mask(other, rows, k)).sum())
    return shared / (n * k)


def knn_overlap_chance(n: int, k: int) -> float:
    """knn_overlap expected for unrelated embeddings: k random items of the other n - 1."""
    return _clipped_k(n, k) / (n - 1)


# --------------------------------------------------------------------------------------------
# Zero-shot mutation effects (masked marginals, Meier et al. 2021, ESM-1v)
# --------------------------------------------------------------------------------------------


def sample_mutation_sites(sequences: Sequence[str], per_protein: int, seed: int) -> list[Site]:
    """`per_protein` distinct random positions of each protein (all if it has fewer), only
    where the residue is one of the 20 standard ones; sorted by protein, then position.

    One numpy generator seeded with `seed` draws protein after protein, so the same sequences
    and seed always give the same sites.
    """
    rng = np.random.default_rng(seed)
    sites = []
    for protein, sequence in enumerate(sequences):
        eligible = [p for p, residue in enumerate(sequence.upper()) if residue in STANDARD_RESIDUES]
        if len(eligible) > per_protein:
            eligible = sorted(rng.choice(eligible, size=per_protein, replace=False).tolist())
        sites += [(protein, p) for p in eligible]
    return sites


def wild_type_columns(sequences: Sequence[str], sites: Sequence[Site]) -> np.ndarray:
    """Per site, the column (index into STANDARD_RESIDUES) of its wild-type residue."""
    columns = []
    for protein, position in sites:
        sequence = sequences[protein]
        if not 0 <= position < len(sequence):
            raise ValueError(f"site {position} is outside protein {protein} ({len(sequence)} residues)")
        residue = sequence[position].upper()
        if residue not in STANDARD_RESIDUES:
            raise ValueError(f"protein {protein} position {position} is {residue!r}, not a standard residue")
        columns.append(STANDARD_RESIDUES.index(residue))
    return np.array(columns, dtype=np.int64)


def residue_token_ids(tokenizer: ResidueTokenizer) -> list[int]:
    """The token ids of the 20 standard residues, in STANDARD_RESIDUES order."""
    missing = [a for a in STANDARD_RESIDUES if a not in tokenizer.vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks the standard residues {''.join(missing)}")
    return [tokenizer.vocab.index(a) for a in STANDARD_RESIDUES]


def site_window(length: int, position: int, max_residues: int | None) -> tuple[int, int]:
    """(start, end) of the residues a site's model input holds: the whole sequence when it fits
    in `max_residues`, else the window of max_residues residues centred on the site, shifted
    inwards at the sequence's ends so that it is always full length."""
    if max_residues is None or length <= max_residues:
        return 0, length
    start = min(max(position - max_residues // 2, 0), length - max_residues)
    return start, start + max_residues


def site_log_probs(
    forward: Callable[[torch.Tensor, torch.Tensor], dict],
    tokenizer: ResidueTokenizer,
    sequences: Sequence[str],
    sites: Sequence[Site],
    max_tokens: int = 8192,
    max_len: int | None = None,
    device: torch.device | str | None = None,
    masked: bool = True,
) -> np.ndarray:
    """log p(aa) at each site for aa in STANDARD_RESIDUES order: float64 [n_sites, 20].

    masked: each site is one copy of its sequence with that residue replaced by the mask token
    (ESM-1v's masked marginal); otherwise the sequence is read unmasked, one copy serving every
    site in it (the wild-type marginal). Inputs are packed into forward passes of at most
    `max_tokens` tokens (rows x padded length). `forward(input_ids, attention_mask)` returns a
    dict with "logits" [B, L, V] (a Student, a Teacher); inputs go to `device` when given. It runs
    under inference mode; putting the model in eval mode is the caller's job. With `max_len`
    (tokens, start/end included) a sequence longer than max_len - 2 residues is cut to the window
    of max_len - 2 residues centred on the site (site_window).
    """
    if max_len is not None and max_len < 3:
        raise ValueError(f"max_len must leave room for a residue and the start/end tokens, got {max_len}")
    residue_ids = residue_token_ids(tokenizer)
    inputs, where = {}, []  # (protein, start, end, masked token or None) -> input number; per site (input, token)
    for protein, position in sites:
        sequence = sequences[protein]
        if not 0 <= position < len(sequence):
            raise ValueError(f"site {position} is outside protein {protein} ({len(sequence)} residues)")
        start, end = site_window(len(sequence), position, None if max_len is None else max_len - 2)
        token = position - start + 1  # +1: the start token precedes the residues
        key = (protein, start, end, token if masked else None)
        where.append((inputs.setdefault(key, len(inputs)), token))
    keys = list(inputs)
    texts = [sequences[protein][start:end] for protein, start, end, _ in keys]
    by_input = {}
    for n, (input_number, token) in enumerate(where):
        by_input.setdefault(input_number, []).append((n, token))

    scores = np.zeros((len(sites), len(STANDARD_RESIDUES)), dtype=np.float64)
    for batch in data.batch_indices([len(t) + 2 for t in texts], max_tokens=max_tokens, shuffle=False):
        input_ids, attention_mask = tokenizer.batch_encode(texts[i] for i in batch)
        for row, i in enumerate(batch):
            if keys[i][3] is not None:
                input_ids[row, keys[i][3]] = tokenizer.mask_id
        rows, columns, site_numbers = [], [], []
        for row, i in enumerate(batch):
            for n, token in by_input[i]:
                rows.append(row)
                columns.append(token)
                site_numbers.append(n)
        if device is not None:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.inference_mode():
            logits = forward(input_ids, attention_mask)["logits"]
            # float64 for the site rows only: small differences of large log-probabilities
            picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device)]
            log_probs = torch.log_softmax(picked.double(), -1)
        scores[site_numbers] = log_probs[:, residue_ids].cpu().numpy()
    return scores


def masked_marginals(
    forward: Callable[[torch.Tensor, torch.Tensor], dict],
    tokenizer: ResidueTokenizer,
    sequences: Sequence[str],
    sites: Sequence[Site],
    max_tokens: int = 8192,
    max_len: int | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Masked-marginal mutation scores: float64 [n_sites, 20], log p(aa) - log p(wild type) at
    the site with the site masked, for aa in STANDARD_RESIDUES order (the wild-type column is 0).
    See site_log_probs for the batching and the windows of long sequences."""
    wild_types = wild_type_columns(sequences, sites)
    scores = site_log_probs(forward, tokenizer, sequences, sites, max_tokens, max_len, device)
    return scores - scores[np.arange(len(sites)), wild_types][:, None]


def _integer_columns(wild_types, count: int) -> np.ndarray:
    columns = np.asarray(wild_types)
    if columns.shape != (count,) or (count and columns.dtype.kind not in "iu"):
        raise ValueError(f"wild_types must be {count} column indices into STANDARD_RESIDUES (see wild_type_columns)")
    return columns


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def mutation_effect_agreement(
    student_scores: np.ndarray, teacher_scores: np.ndarray, sites: Sequence[Site], wild_types
) -> dict:
    """How well the student's masked-marginal scores [n_sites, 20] rank substitutions like the
    teacher's, over the 19 substitutions of each site (the wild-type entry, a constant 0, is
    dropped). `wild_types` holds each site's wild-type column (wild_type_columns).

    Returns "spearman" (all (site, substitution) pairs pooled), "spearman_per_protein_mean"
    (within each protein, averaged over proteins where it is defined), "spearman_within_position_mean"
    (the 19 substitutions of each site, averaged over sites where it is defined; None when none
    is), and the counts "pairs", "sites", "proteins".
    """
    student, teacher = np.asarray(student_scores, np.float64), np.asarray(teacher_scores, np.float64)
    if not len(sites):  # proteins without one standard residue (all X): nothing to rank
        return {
            "spearman": None,
            "spearman_per_protein_mean": None,
            "spearman_within_position_mean": None,
            "pairs": 0,
            "sites": 0,
            "proteins": 0,
        }
    shape = (len(sites), len(STANDARD_RESIDUES))
    if student.shape != shape or teacher.shape != shape:
        raise ValueError(f"need two {shape} score arrays, got {student.shape} and {teacher.shape}")
    substitution = np.ones(shape, dtype=bool)
    substitution[np.arange(len(sites)), _integer_columns(wild_types, len(sites))] = False
    # [n_sites, 19]: row i holds site i's substitutions, in STANDARD_RESIDUES order.
    student = student[substitution].reshape(len(sites), -1)
    teacher = teacher[substitution].reshape(len(sites), -1)
    proteins = np.array([protein for protein, _ in sites], dtype=np.int64)
    return {
        "spearman": spearman(student.ravel(), teacher.ravel()),
        "spearman_per_protein_mean": _mean_defined(
            spearman(student[proteins == p].ravel(), teacher[proteins == p].ravel()) for p in np.unique(proteins)
        ),
        "spearman_within_position_mean": _mean_defined(spearman(s, t) for s, t in zip(student, teacher)),
        "pairs": int(student.size),
        "sites": len(sites),
        "proteins": len(np.unique(proteins)),
    }


def frequency_baseline_scores(residue_frequencies, sites: Sequence[Site], wild_types) -> np.ndarray:
    """The masked marginal of a model that only knows residue frequencies: float64 [n_sites, 20],
    log f(aa) - log f(wild type), columns in STANDARD_RESIDUES order.

    `residue_frequencies` is 20 values in that order (counts work too: the scale cancels); a zero
    frequency scores -inf. `wild_types` as in mutation_effect_agreement.
    """
    log_frequencies = np.log(as_float64(residue_frequencies))
    if log_frequencies.shape != (len(STANDARD_RESIDUES),):
        raise ValueError(f"need {len(STANDARD_RESIDUES)} residue frequencies, got shape {log_frequencies.shape}")
    columns = _integer_columns(wild_types, len(sites))
    return log_frequencies[None, :] - log_frequencies[columns][:, None]
