"""A masked LM to explain, the same whatever its origin (a student, or a HuggingFace teacher with
eager attention): token ids in, logits and attention weights out, plus the embedding layer that
Integrated Gradients attributes to; and the checks of what it is asked to explain."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from architecture import ResidueTokenizer, load_student
from pepemb import data
from pepemb.cli import UserError
from pepemb.variant_scores import parse_positions


@dataclass
class Explainer:
    """A masked LM seen the same way whatever its origin: ids in, logits and attentions out."""

    name: str
    prefix: str  # of every file written for this model: "" (student) or "teacher_"
    model: nn.Module
    tokenizer: ResidueTokenizer
    embeddings: nn.Module  # the token-embedding layer that Integrated Gradients attributes to
    num_layers: int
    num_heads: int
    width: int  # hidden size
    max_tokens: int  # longest input the model takes, cls/eos included

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def attentions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[layers, heads, L, L] softmax weights for one unpadded sequence [L]."""
        with torch.inference_mode():
            out = self.model(input_ids=input_ids[None].to(self.device), output_attentions=True)
        attentions = out["attentions"]
        if not attentions or attentions[0] is None:
            raise UserError(f"{self.name} returned no attention weights; it cannot be visualised")
        return torch.stack([a[0].float() for a in attentions]).cpu()

    def true_residue_log_probs(self, input_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
        """[B, L]: log p(true token) at every position (Captum's forward function)."""
        logits = self.model(input_ids=input_ids)["logits"].float()
        return logits.log_softmax(-1).gather(-1, true_ids[..., None]).squeeze(-1)


def load_student_explainer(model_path: str, device: torch.device) -> Explainer:
    model, tokenizer, _ = load_student(model_path, map_location=device)
    model.requires_grad_(False)  # Integrated Gradients needs gradients of the embeddings only
    path = Path(model_path)
    folder = path.parent if path.name == "model.pt" else path
    c = model.config
    name = f"student {folder.name} ({c.num_layers} layers x {c.num_heads} heads, d {c.d_model})"
    return Explainer(
        name, "", model, tokenizer, model.embed_tokens, c.num_layers, c.num_heads, c.d_model, max_tokens=sys.maxsize
    )  # rotary positions: no length limit


def load_teacher_explainer(name_or_path: str, device: torch.device) -> Explainer:
    from pepemb.teacher import load_teacher  # transformers is heavy: import it only when asked for

    teacher = load_teacher(name_or_path, device=device)
    try:
        # The fused kernels (sdpa, flash) compute attention without materialising its weights.
        teacher.model.set_attn_implementation("eager")
    except (ValueError, AttributeError) as err:
        raise UserError(
            f"teacher {name_or_path}: cannot switch to eager attention, so its "
            f"attention weights are not available ({err})"
        ) from err
    c = teacher.model.config
    return Explainer(
        f"teacher {teacher.name}",
        "teacher_",
        teacher.model,
        teacher.tokenizer,
        teacher.model.get_input_embeddings(),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.hidden_size,
        teacher.max_positions,
    )


def check_teacher(teacher: Explainer, student: Explainer, proteins: list[data.Protein]) -> None:
    """UserError unless the teacher reads the student's token ids and takes every protein."""
    if teacher.tokenizer.vocab_hash != student.tokenizer.vocab_hash:
        raise UserError(
            f"{teacher.name} and the student do not share a vocabulary (hash "
            f"{teacher.tokenizer.vocab_hash} vs {student.tokenizer.vocab_hash}); "
            f"compare a student with the teacher it was distilled from"
        )
    too_long = [p for p in proteins if len(p.sequence) + 2 > teacher.max_tokens]
    if too_long:
        raise UserError(
            f"{too_long[0].id} has {len(too_long[0].sequence)} residues; "
            f"{teacher.name} takes at most {teacher.max_tokens - 2}"
        )


def check_sequence(sequence: str, tokenizer: ResidueTokenizer, where: str) -> str:
    """The sequence upper-cased, or UserError naming the first letter the vocabulary lacks."""
    sequence = sequence.strip().upper()
    if not sequence:
        raise UserError(f"{where}: the sequence is empty")
    letters = {t for t in tokenizer.vocab if len(t) == 1 and t.isalpha()}
    for position, letter in enumerate(sequence, 1):
        if letter not in letters:
            raise UserError(
                f"{where}: {letter!r} at position {position} is not an amino-acid "
                f"letter of the model's vocabulary ({''.join(sorted(letters))})"
            )
    return sequence


def choose_targets(
    length: int, target_position: int | None, positions: str | None, max_positions: int, protein_id: str | None = None
) -> tuple[list[int], str | None]:
    """(1-based target positions, a note when they were subsampled to max_positions). The
    subsample keeps the first and the last position (so not data.evenly_spaced, which ends short
    of the last); protein_id names the protein in a --positions error."""
    if target_position is not None:
        if not 1 <= target_position <= length:
            raise UserError(f"--target_position {target_position} is outside the sequence (positions 1..{length})")
        return [target_position], None
    targets = parse_positions(positions or None, length, protein_id)
    if len(targets) <= max_positions:
        return targets, None
    keep = np.unique(np.linspace(0, len(targets) - 1, max_positions).round().astype(int))
    note = (
        f"saliency for {len(keep)} of {len(targets)} target positions, evenly spaced (raise --max_positions to use all)"
    )
    return [targets[i] for i in keep], note
