"""Teacher cache: the teacher's logits, computed once, replayed to every student distilled after.

A distillation step costs what the teacher's forward pass costs (a ProtBert-sized teacher is
about 30x slower than a 7.6M student), and every epoch pays it again. With
`distill.py --teacher_cache DIR --mask_variants K`, training sequence j is masked in one of K
fixed ways (epoch e uses mask variant e mod K, like BERT's duplicate factor) and the
validation sequences in one, so the teacher's outputs can be kept: the first K epochs of the
first run write them as they are computed (no extra teacher passes), later epochs and later runs
(another student size, another learning rate) read them and never load the teacher.
cache_teacher.py fills a cache ahead of training, e.g. on a GPU box.

What is stored, per (mask variant, sequence): the teacher's logits in fp16 at the positions the
loss reads (the masked positions; every non-pad position with --distill_positions all):

    DIR/manifest.json          the settings the cache holds (checked on every open), the teacher's
                               tokenizer and description (so a run needs nothing from the teacher)
                               and the variants that are complete
    DIR/val.logits.npy         fp16 [positions, V], one sequence after another (np.load(mmap_mode="r"))
    DIR/val.offsets.npy        int64 [sequences + 1]: sequence j's rows are offsets[j]:offsets[j + 1]
    DIR/train{v}.logits.npy, DIR/train{v}.offsets.npy      for v = 0 .. K - 1

A variant being filled lives in train{v}.logits.partial.npy, with the sequences already written
in train{v}.filled.npy, saved by flush() after the logits themselves: a killed fill continues
from there. A complete variant is renamed into place, and only then marked complete in the
manifest. One process fills a cache at a time (an advisory lock on DIR/.lock). Reading and the
manifest are here; the filling itself is cache_writer.py's.

Only full logits of small vocabularies are stored: up to MAX_VOCAB tokens, which covers the
protein LMs (ProtBert's 30 tokens cost 60 bytes a position). Larger vocabularies would need
top-k logits plus a log-sum-exp per position; that storage is not implemented. Hidden states
are not stored either, so --hidden_weight needs the live teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from architecture import ResidueTokenizer
from pepemb import data
from pepemb.cache_writer import CacheWriter, take_lock
from pepemb.cli import UserError
from pepemb.files import atomic_open

FORMAT = "pepemb-teacher-cache"
FORMAT_VERSION = 1
MAX_VOCAB = 1024
PRECISION = "fp16"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings"  # DIR/embeddings.npy: the teacher's per-protein embedding of each sequence
# Settings a cache must have been made with to serve a run; vocab_hash is checked as well
# whenever the teacher is loaded.
CHECKED_SETTINGS = (
    "teacher",
    "data_hash",
    "mask_seed",
    "mask_prob",
    "max_seq_len",
    "mask_variants",
    "distill_positions",
    "precision",
)


def data_hash(train_sequences: Sequence[str], val_sequences: Sequence[str]) -> str:
    """Fingerprint of the training and validation sequences, in order."""
    digest = hashlib.sha256()
    for split, sequences in (("train", train_sequences), ("val", val_sequences)):
        digest.update(f">{split} {len(sequences)}\n".encode())
        for sequence in sequences:
            digest.update(sequence.encode() + b"\n")
    return digest.hexdigest()[:16]


def run_settings(
    teacher_model: str, masking: data.Masking, mask_variants: int, distill_positions: str, fingerprint: str
) -> dict:
    """The CHECKED_SETTINGS of a run of this teacher, masking, number of mask variants and cached
    positions (distill.py's flags of those names) on data with this data_hash."""
    return {
        "teacher": teacher_model,
        "data_hash": fingerprint,
        "mask_seed": masking.seed,
        "mask_prob": masking.mask_prob,
        "max_seq_len": masking.max_seq_len,
        "mask_variants": mask_variants,
        "distill_positions": distill_positions,
        "precision": PRECISION,
    }


def describe_teacher(teacher) -> dict:
    """What a run needs to know of a teacher it does not load (teacher.Teacher -> JSON values)."""
    return {
        "name": teacher.name,
        "backend": teacher.backend,
        "num_parameters": teacher.num_parameters,
        "hidden_size": teacher.hidden_size,
        "max_positions": teacher.max_positions,
    }


def new_manifest(teacher, settings: dict, train_sequences: int, val_sequences: int) -> dict:
    """The manifest of a new cache of this teacher's outputs, with no variant complete yet."""
    tokenizer = teacher.tokenizer
    details = {k: v for k, v in describe_teacher(teacher).items() if k != "name"}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **settings,
        "vocab_hash": tokenizer.vocab_hash,
        "vocab_size": len(tokenizer),
        "tokenizer": tokenizer.to_dict(),
        "teacher_details": details,
        "train_sequences": train_sequences,
        "val_sequences": val_sequences,
        "complete": {},
    }


class TeacherCache:
    """A folder of cached teacher logits (see the module docstring): what it holds, the check of
    a run's settings against it, and reading.

    Reading needs only the folder. Writing needs `start_filling` first, which writes the
    manifest of a new cache (or checks the teacher's vocabulary against an existing one), takes
    the folder's lock and hands is_filled / write / flush to a cache_writer.CacheWriter; `flush`
    makes the progress of half-filled variants durable.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = self._read_manifest()
        self._readers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._writer: CacheWriter | None = None

    # -- what the cache holds ----------------------------------------------------------------
    @property
    def teacher(self) -> dict | None:
        """The teacher's description (name, backend, num_parameters, hidden_size, max_positions)."""
        if self.manifest is None:
            return None
        return {"name": self.manifest["teacher"], **self.manifest["teacher_details"]}

    @property
    def tokenizer(self) -> ResidueTokenizer:
        return ResidueTokenizer.from_dict(self.manifest["tokenizer"])

    def is_complete(self, variant: int) -> bool:
        return self.manifest is not None and self.part(variant) in self.manifest["complete"]

    def serves(self, variants: Iterable[int]) -> bool:
        """Whether every one of these mask variants is complete (readable without the teacher)."""
        return all(self.is_complete(v) for v in variants)

    def check(self, settings: dict) -> None:
        """Refuse a cache made with other settings, naming every field that differs."""
        if self.manifest is None:
            return
        differ = [
            f"{k} (cached {self.manifest[k]!r}, now {settings[k]!r})"
            for k in CHECKED_SETTINGS
            if self.manifest[k] != settings[k]
        ]
        if differ:
            raise UserError(
                f"teacher cache {self.directory} was made with other settings: {'; '.join(differ)}. "
                "Pass the flags it was made with, or another --teacher_cache folder "
                "(data_hash fingerprints the training and validation sequences)"
            )

    # -- filling (cache_writer.CacheWriter) ---------------------------------------------------
    def start_filling(
        self, teacher, settings: dict, train_sequences: Sequence[str], val_sequences: Sequence[str]
    ) -> None:
        """Prepare to write this teacher's outputs: a new cache gets its manifest, an existing one
        must match the settings and the teacher's vocabulary."""
        tokenizer = teacher.tokenizer
        if len(tokenizer) > MAX_VOCAB:
            raise UserError(
                f"teacher {teacher.name} has {len(tokenizer)} tokens: --teacher_cache stores full "
                f"logits, so only small vocabularies (up to {MAX_VOCAB} tokens, e.g. every protein "
                "LM) are cached; train without --teacher_cache"
            )
        if self._writer is None:
            self._writer = CacheWriter(self, take_lock(self.directory))
        try:
            self.manifest = self._read_manifest()  # as the previous holder of the lock left it
            if self.manifest is None:
                self.manifest = new_manifest(teacher, settings, len(train_sequences), len(val_sequences))
                self.write_manifest()
            self.check(settings)
            if self.manifest["vocab_hash"] != tokenizer.vocab_hash:
                raise UserError(
                    f"teacher cache {self.directory} was made with another vocabulary: vocab_hash "
                    f"(cached {self.manifest['vocab_hash']!r}, now {tokenizer.vocab_hash!r}) for "
                    f"teacher {teacher.name}; use another --teacher_cache folder"
                )
        except BaseException:
            self.close()
            raise
        self._writer.sequences = {"train": train_sequences, "val": val_sequences}

    def is_filled(self, variant: int, indices: Sequence[int]) -> bool:
        """Whether these sequences of a variant are written (complete, or filled and flushed)."""
        return self.is_complete(variant) or self._writing().is_filled(variant, indices)

    def write(self, variant: int, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch's teacher logits [B, L, V] at the cached positions; returns the logits
        rounded to fp16 and back, which is what `read` will give."""
        return self._writing().write(variant, batch, logits)

    def flush(self) -> None:
        """Make what has been written durable (CacheWriter.flush)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Drop the open files and the lock (without flushing: call flush first to keep progress)."""
        self._readers.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- per-protein embeddings (distill.py --embedding_weight) -------------------------------
    @property
    def has_embeddings(self) -> bool:
        return self.manifest is not None and EMBEDDINGS in self.manifest["complete"]

    def write_embeddings(self, embeddings: np.ndarray) -> None:
        """Store the teacher's per-protein embedding of every training then validation sequence
        (float32 [train + val, hidden]); needs start_filling first."""
        m = self.manifest
        expected = (m["train_sequences"] + m["val_sequences"], m["teacher_details"]["hidden_size"])
        if embeddings.shape != expected:
            raise ValueError(f"teacher embeddings of shape {embeddings.shape}, expected {expected}")
        with atomic_open(self.directory / f"{EMBEDDINGS}.npy") as f:
            np.save(f, embeddings.astype(np.float32))
        self.manifest["complete"][EMBEDDINGS] = True
        self.write_manifest()

    def read_embeddings(self) -> np.ndarray:
        """write_embeddings' array, memory-mapped."""
        return np.load(self.directory / f"{EMBEDDINGS}.npy", mmap_mode="r")

    # -- reading -----------------------------------------------------------------------------
    def read(self, variant: int, batch: dict) -> torch.Tensor:
        """The teacher's logits [B, L, V] (float32, on the batch's device) for a batch of a
        complete variant: the cached values at the cached positions, NaN elsewhere, so that a
        position the cache does not hold poisons a loss instead of passing unnoticed."""
        if variant not in self._readers:
            self._readers[variant] = self._open_complete(variant)
        logits, offsets = self._readers[variant]
        positions = self.positions(batch)
        rows = self.rows(offsets, batch["sequence_index"].tolist(), positions)
        out = torch.full((*positions.shape, logits.shape[1]), float("nan"), device=positions.device)
        out[positions] = torch.from_numpy(logits[rows]).to(positions.device, torch.float32)
        return out

    # -- the layout, shared with the writer ----------------------------------------------------
    def part(self, variant: int) -> str:
        """The name of a variant's files and manifest entry: "val" or "train{v}"."""
        if variant == data.VALIDATION_VARIANT:
            return "val"
        if self.manifest is not None and not 0 <= variant < self.manifest["mask_variants"]:
            raise ValueError(f"mask variant {variant} is outside the cache's 0..{self.manifest['mask_variants'] - 1}")
        return f"train{variant}"

    def file(self, variant: int, suffix: str) -> Path:
        return self.directory / f"{self.part(variant)}.{suffix}"

    def positions(self, batch: dict) -> torch.Tensor:
        """The positions of a batch the cache holds (data.kl_positions of its distill_positions)."""
        return data.kl_positions(batch["labels"], batch["attention_mask"], self.manifest["distill_positions"])

    def rows(self, offsets: np.ndarray, indices: list[int], positions: torch.Tensor) -> np.ndarray:
        """Rows of the logits array holding these sequences' positions, in batch order."""
        counts = positions.sum(dim=1).tolist()
        for j, n in zip(indices, counts):
            if offsets[j + 1] - offsets[j] != n:
                raise UserError(
                    f"teacher cache {self.directory}: sequence {j} has {n} cached positions in this "
                    f"batch but {offsets[j + 1] - offsets[j]} in the cache, so its masks are not the "
                    "ones the cache was made with (another version of data.py?); delete the folder "
                    "and fill it again"
                )
        return np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in indices])

    def write_manifest(self) -> None:
        with atomic_open(self.directory / MANIFEST, "w") as f:
            f.write(json.dumps(self.manifest, indent=2) + "\n")

    # -- internals ---------------------------------------------------------------------------
    def _writing(self) -> CacheWriter:
        if self._writer is None:
            raise RuntimeError("call start_filling before writing to a teacher cache")
        return self._writer

    def _open_complete(self, variant: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            logits = np.load(self.file(variant, "logits.npy"), mmap_mode="r")
            offsets = np.load(self.file(variant, "offsets.npy"))
        except (OSError, ValueError) as err:
            raise UserError(
                f"teacher cache {self.directory}: variant {self.part(variant)} is marked complete "
                f"but cannot be read ({err}); delete the folder and fill it again"
            ) from err
        if logits.shape != (offsets[-1], self.manifest["vocab_size"]):
            raise UserError(
                f"teacher cache {self.directory}: {self.part(variant)}.logits.npy has shape "
                f"{logits.shape}, its offsets say ({offsets[-1]}, {self.manifest['vocab_size']}); "
                "delete the folder and fill it again"
            )
        return logits, offsets

    def _read_manifest(self) -> dict | None:
        path = self.directory / MANIFEST
        if not path.is_file():
            if self.directory.is_dir() and any(not p.name.startswith(".") for p in self.directory.iterdir()):
                raise UserError(
                    f"--teacher_cache {self.directory} holds files but no {MANIFEST}: it is not a "
                    "teacher cache; pass a new or empty folder"
                )
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable teacher cache manifest ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{path} is not a PepEmb teacher cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path}: teacher cache format_version {manifest.get('format_version')!r} is not "
                f"supported (this code reads version {FORMAT_VERSION}); fill a new cache"
            )
        return manifest
