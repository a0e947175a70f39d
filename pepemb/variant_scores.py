"""Zero-shot mutation scores with any masked protein LM: mutation lists and scans checked against
the sequences, then masked-marginal, wild-type-marginal or pseudo-log-likelihood scores (as ESM's
variant-prediction example), batched under a token budget, windowed for long proteins."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from architecture import STANDARD_RESIDUES
from pepemb import data, fidelity
from pepemb.cli import UserError

STRATEGIES = ("masked-marginal", "wt-marginal", "pll")
_MUTATION = re.compile(r"^([A-Za-z])(\d+)([A-Za-z])$")
_POSITIONS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")  # 20, or 20-40


@dataclass(frozen=True)
class Mutation:
    """One variant of a protein: substitutions (wild type, 1-based position, mutant), and its text."""

    protein: int  # index into the proteins scored
    substitutions: tuple[tuple[str, int, str], ...]
    text: str  # as written: A23G, or A23G:K45R


def parse_mutation(text: str, sequence: str, where: str, protein: int) -> Mutation:
    """A23G or A23G:K45R checked against the sequence; UserError naming `where` otherwise."""
    substitutions = []
    for part in text.strip().split(":"):
        match = _MUTATION.match(part.strip())
        if not match:
            raise UserError(
                f"{where}: {text!r} is not a mutation like A23G (wild type, 1-based position, mutant; "
                "several joined by ':')"
            )
        wild, position, mutant = match.group(1).upper(), int(match.group(2)), match.group(3).upper()
        for letter in (wild, mutant):
            if letter not in STANDARD_RESIDUES:
                raise UserError(f"{where}: {part}: {letter!r} is not one of the 20 standard residues")
        if not 1 <= position <= len(sequence):
            raise UserError(f"{where}: {part}: position {position} is outside the sequence ({len(sequence)} residues)")
        if sequence[position - 1].upper() != wild:
            raise UserError(f"{where}: {part}: residue {position} is {sequence[position - 1]}, not {wild}")
        if mutant == wild:
            raise UserError(f"{where}: {part}: the mutant is the wild type")
        substitutions.append((wild, position, mutant))
    if len({p for _, p, _ in substitutions}) < len(substitutions):
        raise UserError(f"{where}: {text}: a position is mutated twice")
    return Mutation(protein, tuple(substitutions), text.strip())


def read_mutations(path: str | Path, proteins: list[data.Protein]) -> list[Mutation]:
    """A CSV with the header `id,mutation`, every line checked before any model runs."""
    index = {p.id: i for i, p in enumerate(proteins)}
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise UserError(f"--mutations {path}: {err.strerror}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["id", "mutation"]:
        raise UserError(f"{path} line 1: the header must be 'id,mutation'")
    mutations = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{path} line {number}"
        if len(row) < 2:
            raise UserError(f"{where}: expected 'id,mutation', got {','.join(row)!r}")
        if row[0] not in index:
            raise UserError(f"{where}: no sequence with id {row[0]!r} in the FASTA file")
        protein = index[row[0]]
        mutations.append(parse_mutation(row[1], proteins[protein].sequence, where, protein))
    if not mutations:
        raise UserError(f"{path}: no mutations to score")
    return mutations


def parse_positions(text: str | None, length: int, protein_id: str | None = None) -> list[int]:
    """Sorted unique 1-based positions of '20-40,95' (all of the protein when None), each within
    1..length; UserError naming --positions, the part at fault and, if given, the protein."""
    if text is None:
        return list(range(1, length + 1))
    positions = set()
    for part in text.split(","):
        match = _POSITIONS.fullmatch(part)
        if not match:
            raise UserError(
                f"--positions {text!r}: {part!r} is not a position or a range (give positions like 20-40,95)"
            )
        start, end = int(match[1]), int(match[2] or match[1])
        if start > end:
            raise UserError(f"--positions {text!r}: range {start}-{end} runs backwards")
        if start < 1 or end > length:
            where = (
                f"{protein_id} ({length} residues, positions 1..{length})"
                if protein_id
                else f"the sequence (positions 1..{length})"
            )
            raise UserError(f"--positions {text!r}: {part.strip()} is outside {where}")
        positions.update(range(start, end + 1))
    return sorted(positions)


def scan(proteins: list[data.Protein], positions: str | None) -> list[Mutation]:
    """Every single substitution (19 per residue) at the positions of every protein; residues that
    are not standard (X, ...) are skipped."""
    mutations = []
    for i, protein in enumerate(proteins):
        for position in parse_positions(positions, len(protein.sequence), protein.id):
            wild = protein.sequence[position - 1].upper()
            if wild in STANDARD_RESIDUES:
                mutations += [
                    Mutation(i, ((wild, position, aa),), f"{wild}{position}{aa}")
                    for aa in STANDARD_RESIDUES
                    if aa != wild
                ]
    return mutations


def marginal_scores(
    forward,
    tokenizer,
    proteins: list[data.Protein],
    mutations: list[Mutation],
    *,
    masked: bool,
    max_tokens: int,
    max_len: int | None,
    device,
) -> np.ndarray:
    """Per mutation, the sum over its substitutions of log p(mutant) - log p(wild type) at the site:
    masked (masked marginal) or read from the unmasked sequence (wild-type marginal)."""
    sequences = [p.sequence for p in proteins]
    sites = sorted({(m.protein, position - 1) for m in mutations for _, position, _ in m.substitutions})
    row = {site: i for i, site in enumerate(sites)}
    log_probs = fidelity.site_log_probs(forward, tokenizer, sequences, sites, max_tokens, max_len, device, masked)
    column = {aa: i for i, aa in enumerate(STANDARD_RESIDUES)}
    return np.array(
        [
            sum(
                log_probs[row[(m.protein, p - 1)], column[mt]] - log_probs[row[(m.protein, p - 1)], column[wt]]
                for wt, p, mt in m.substitutions
            )
            for m in mutations
        ]
    )


def mutant_sequence(sequence: str, mutation: Mutation) -> str:
    residues = list(sequence)
    for _, position, mutant in mutation.substitutions:
        residues[position - 1] = mutant
    return "".join(residues)


def pseudo_log_likelihoods(
    forward, tokenizer, sequences: list[str], *, max_tokens: int, max_len: int | None, device
) -> np.ndarray:
    """Per sequence, the sum over its standard residues of log p(residue | the rest), each masked in
    turn (len(sequence) forward rows per sequence)."""
    sites = [(i, p) for i, s in enumerate(sequences) for p, aa in enumerate(s.upper()) if aa in STANDARD_RESIDUES]
    log_probs = fidelity.site_log_probs(forward, tokenizer, sequences, sites, max_tokens, max_len, device)
    wild = fidelity.wild_type_columns(sequences, sites)
    totals = np.zeros(len(sequences))
    np.add.at(totals, [i for i, _ in sites], log_probs[np.arange(len(sites)), wild])
    return totals


def score(
    forward,
    tokenizer,
    proteins: list[data.Protein],
    mutations: list[Mutation],
    strategy: str,
    *,
    max_tokens: int = 8192,
    max_len: int | None = None,
    device=None,
) -> np.ndarray:
    """One score per mutation (higher: the model finds the mutant more likely than the wild type)."""
    options = dict(max_tokens=max_tokens, max_len=max_len, device=device)
    if strategy in ("masked-marginal", "wt-marginal"):
        return marginal_scores(forward, tokenizer, proteins, mutations, masked=strategy == "masked-marginal", **options)
    if strategy != "pll":
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    used = sorted({m.protein for m in mutations})
    wild = dict(zip(used, pseudo_log_likelihoods(forward, tokenizer, [proteins[i].sequence for i in used], **options)))
    variants = [mutant_sequence(proteins[m.protein].sequence, m) for m in mutations]
    return pseudo_log_likelihoods(forward, tokenizer, variants, **options) - np.array(
        [wild[m.protein] for m in mutations]
    )


def agreement(mutations, scores: np.ndarray, teacher_scores: np.ndarray) -> dict:
    """Spearman of two models' scores over all variants and, averaged, within each protein."""
    proteins = np.array([m.protein for m in mutations])
    per_protein = [fidelity.spearman(scores[proteins == p], teacher_scores[proteins == p]) for p in np.unique(proteins)]
    defined = [r for r in per_protein if r is not None]
    return {
        "spearman": fidelity.spearman(scores, teacher_scores),
        "spearman_per_protein_mean": float(np.mean(defined)) if defined else None,
    }
