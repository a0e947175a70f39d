"""Models seen as token ids -> hidden states (a student or any HuggingFace masked LM), and
sequences -> per-residue embeddings, long ones through overlapping windows."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from architecture import CHECKPOINT_FORMAT, EXPORTED_WEIGHTS, ResidueTokenizer, Student, load_student
from pepemb import data, devices
from pepemb.cli import UserError

DEFAULT_MAX_LENGTH = 1022  # residues: ESM's truncation_seq_length, 1024 tokens with start/end


@dataclass
class Embedder:
    """A student or HuggingFace masked LM, seen as: token ids -> hidden states of every layer."""

    model: nn.Module
    tokenizer: ResidueTokenizer
    name: str
    max_positions: int = sys.maxsize  # tokens incl. start/end; rotary models have no limit
    metadata: dict = field(default_factory=dict)  # a student's training metadata

    @property
    def is_student(self) -> bool:
        return isinstance(self.model, Student)

    @property
    def num_layers(self) -> int:
        config = self.model.config
        return config.num_layers if self.is_student else config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return config.d_model if self.is_student else config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """{"logits": [B, L, V]}: the forward that fidelity.site_log_probs and variant_scores call."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode():
            if self.is_student:
                return {"logits": self.model(input_ids, attention_mask)["logits"]}
            return {"logits": self.model(input_ids=input_ids, attention_mask=attention_mask).logits}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, ...]:
        """num_layers + 1 tensors [B, L, D]: the embedding output, then each layer's output."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.inference_mode(), devices.autocast(self.device, autocast_dtype):
            if self.is_student:
                return self.model(input_ids, attention_mask, output_hidden_states=True)["hidden_states"]
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            ).hidden_states


def load_embedder(name: str, device: torch.device, half: bool = False, trust_remote_code: bool = False) -> Embedder:
    """A student checkpoint, an --export_hf folder, or (anything else) a HuggingFace masked LM."""
    path = Path(name).expanduser()
    if (
        path.suffix == ".pt"
        or (path / "model.pt").is_file()
        or ((path / EXPORTED_WEIGHTS).is_file() and _is_student_config(path / "config.json"))
    ):
        checkpoint = load_student(path, map_location=device)
    else:
        from pepemb.teacher import load_teacher  # transformers is heavy: import it only when needed

        teacher = load_teacher(name, device=device, half=half, trust_remote_code=trust_remote_code)
        label = str(path.resolve()) if path.is_dir() else name  # one name per model, for --resume
        return Embedder(teacher.model, teacher.tokenizer, label, teacher.max_positions)
    return Embedder(checkpoint.model, checkpoint.tokenizer, str(path.resolve()), metadata=checkpoint.metadata)


def _is_student_config(path: Path) -> bool:
    """A config.json of a student: the old export layout, or a native export's (hf_export.py)."""
    try:
        config = json.loads(path.read_text())
        return config.get("format") == CHECKPOINT_FORMAT or "pepemb" in config
    except (OSError, ValueError, AttributeError):
        return False


def absolute_layers(repr_layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer numbers in 0..num_layers (negative ones count from the end), duplicates dropped."""
    bad = [i for i in repr_layers if not -(num_layers + 1) <= i <= num_layers]
    if bad:
        raise UserError(
            f"--repr_layers {' '.join(map(str, bad))} out of range: the model has "
            f"{num_layers} layers, so use 0..{num_layers} (0 = embeddings) or "
            f"-{num_layers + 1}..-1 (-1 = last)"
        )
    return list(dict.fromkeys(i % (num_layers + 1) for i in repr_layers))


def window_sizes(
    embedder: Embedder, max_length: int | None, overlap: int | None, long: str = "chunk"
) -> tuple[int, int]:
    """(residues per window, overlap between windows), checked against the model's limit: by
    default DEFAULT_MAX_LENGTH (or the model's limit if lower) and min(64, max_length // 4)."""
    limit = embedder.max_positions - 2
    max_length = max_length or min(DEFAULT_MAX_LENGTH, limit)
    if max_length > limit:
        raise UserError(
            f"--max_length {max_length} exceeds what {embedder.name} takes "
            f"({limit} residues plus start/end tokens); pass --max_length {limit} or less"
        )
    overlap = min(64, max_length // 4) if overlap is None else overlap
    if long == "chunk" and overlap >= max_length:
        raise UserError(f"--overlap {overlap} must be smaller than the window (--max_length {max_length})")
    return max_length, overlap


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of the windows of `window` residues that cover a sequence of `length` residues.

    Consecutive windows share at least `overlap` residues; the last one ends at the sequence's
    end, so every window is full length and gets the same context.
    """
    if length <= window:
        return [0]
    return list(range(0, length - window, window - overlap)) + [length - window]


@dataclass
class Embedded:
    index: int  # position in the input sequences
    per_residue: dict[int, torch.Tensor]  # layer -> [residues, D] float32, on the CPU
    cls: dict[int, torch.Tensor]  # layer -> [D], the start token of the first window
    windows: int


def embed_sequences(
    embedder: Embedder,
    sequences: Sequence[str],
    layers: Sequence[int],
    max_tokens: int = 8192,
    max_length: int = DEFAULT_MAX_LENGTH,
    long: str = "chunk",
    overlap: int = 64,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[Embedded]:
    """Embed every sequence, yielding each once all its windows are done (shortest first).

    Windows (a single one per sequence that fits, or with long="truncate") are batched by
    data.batch_indices under the token budget. A residue's embedding is the mean over the
    windows that contain it; with one window that is exactly the model's output.
    """
    pieces = []  # (sequence index, start, end) of each window
    for i, sequence in enumerate(sequences):
        if long == "truncate" or len(sequence) <= max_length:
            pieces.append((i, 0, min(len(sequence), max_length)))
        else:
            pieces += [(i, s, s + max_length) for s in window_starts(len(sequence), max_length, overlap)]
    texts = [sequences[i][start:end] for i, start, end in pieces]
    lengths = data.token_lengths(texts, max_length + 2)
    windows = Counter(i for i, _, _ in pieces)
    windows_left = windows.copy()
    sums, counts, cls = {}, {}, {}  # per sequence being assembled

    for batch in data.batch_indices(lengths, max_tokens=max_tokens, shuffle=False):
        input_ids, attention_mask = embedder.tokenizer.batch_encode(texts[j] for j in batch)
        hidden = embedder.hidden_states(input_ids, attention_mask, autocast_dtype)
        hidden = {layer: hidden[layer].float().cpu() for layer in layers}
        for row, j in enumerate(batch):
            i, start, end = pieces[j]
            if i not in sums:
                n = end if long == "truncate" else len(sequences[i])
                sums[i] = {layer: torch.zeros(n, embedder.hidden_size) for layer in layers}
                counts[i] = torch.zeros(n, 1)
            for layer in layers:
                sums[i][layer][start:end] += hidden[layer][row, 1 : end - start + 1]
            counts[i][start:end] += 1
            if start == 0:
                cls[i] = {layer: hidden[layer][row, 0].clone() for layer in layers}
            windows_left[i] -= 1
            if windows_left[i] == 0:
                count = counts.pop(i)
                per_residue = {layer: total / count for layer, total in sums.pop(i).items()}
                yield Embedded(i, per_residue, cls.pop(i), windows[i])
