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
manifest. One process fills a cache at a time (an advisory lock on DIR/.lock).

Only full logits of small vocabularies are stored: up to MAX_VOCAB tokens, which covers the
protein LMs (ProtBert's 30 tokens cost 60 bytes a position). Larger vocabularies would need
top-k logits plus a log-sum-exp per position; that storage is not implemented. Hidden states
are not stored either, so --hidden_weight needs the live teacher.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from architecture import ResidueTokenizer
from pepemb import data
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


class TeacherCache:
    """A folder of cached teacher logits (see the module docstring).

    Reading needs only the folder. Writing needs `start_filling` first, which writes the
    manifest of a new cache (or checks the teacher's vocabulary against an existing one) and
    takes the folder's lock; `flush` makes the progress of half-filled variants durable.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = self._read_manifest()
        self._readers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._fills: dict[int, _Fill] = {}
        self._sequences: dict[str, Sequence[str]] = {}
        self._lock = None

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
        return self.manifest is not None and self._part(variant) in self.manifest["complete"]

    def serves(self, variants: Iterable[int]) -> bool:
        """Whether every one of these mask variants is complete (readable without the teacher)."""
        return all(self.is_complete(v) for v in variants)

    def is_filled(self, variant: int, indices: Sequence[int]) -> bool:
        """Whether these sequences of a variant are written (complete, or filled and flushed)."""
        if self.is_complete(variant):
            return True
        fill = self._fills.get(variant) or self._resume_fill(variant)
        return bool(fill.filled[list(indices)].all())

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

    # -- filling -----------------------------------------------------------------------------
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
        self._take_lock()
        try:
            self.manifest = self._read_manifest()  # as the previous holder of the lock left it
            if self.manifest is None:
                details = {k: v for k, v in describe_teacher(teacher).items() if k != "name"}
                self.manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    **settings,
                    "vocab_hash": tokenizer.vocab_hash,
                    "vocab_size": len(tokenizer),
                    "tokenizer": tokenizer.to_dict(),
                    "teacher_details": details,
                    "train_sequences": len(train_sequences),
                    "val_sequences": len(val_sequences),
                    "complete": {},
                }
                self._write_manifest()
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
        self._sequences = {"train": train_sequences, "val": val_sequences}

    def write(self, variant: int, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch's teacher logits [B, L, V] at the cached positions; returns the logits
        rounded to fp16 and back, which is what `read` will give."""
        fill = self._fills.get(variant) or self._resume_fill(variant)
        positions = self._positions(batch)
        rounded = logits.to(torch.float16)
        values = rounded[positions]
        if not torch.isfinite(values).all():
            raise UserError(
                f"teacher cache {self.directory}: the teacher's logits are not finite in fp16 "
                f"(largest magnitude {logits[positions].abs().max().item():.3g}); train without "
                "--teacher_cache"
            )
        indices = batch["sequence_index"].tolist()
        fill.logits[self._rows(fill.offsets, indices, positions)] = values.cpu().numpy()
        fill.filled[indices] = True
        if fill.filled.all():
            self._complete(variant, fill)
        return rounded.to(logits.dtype)

    def flush(self) -> None:
        """Make what has been written durable: the logits first, then the record of which
        sequences they cover, so that a record never claims logits that were lost."""
        for variant, fill in self._fills.items():
            fill.logits.flush()
            with atomic_open(self._file(variant, "filled.npy")) as f:
                np.save(f, fill.filled)

    def close(self) -> None:
        """Drop the open files and the lock (without flushing: call flush first to keep progress)."""
        self._readers.clear()
        self._fills.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

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
        self._write_manifest()

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
        positions = self._positions(batch)
        rows = self._rows(offsets, batch["sequence_index"].tolist(), positions)
        out = torch.full((*positions.shape, logits.shape[1]), float("nan"), device=positions.device)
        out[positions] = torch.from_numpy(logits[rows]).to(positions.device, torch.float32)
        return out

    # -- internals ---------------------------------------------------------------------------
    def _part(self, variant: int) -> str:
        if variant == data.VALIDATION_VARIANT:
            return "val"
        if self.manifest is not None and not 0 <= variant < self.manifest["mask_variants"]:
            raise ValueError(f"mask variant {variant} is outside the cache's 0..{self.manifest['mask_variants'] - 1}")
        return f"train{variant}"

    def _file(self, variant: int, suffix: str) -> Path:
        return self.directory / f"{self._part(variant)}.{suffix}"

    def _positions(self, batch: dict) -> torch.Tensor:
        return data.kl_positions(batch["labels"], batch["attention_mask"], self.manifest["distill_positions"])

    def _rows(self, offsets: np.ndarray, indices: list[int], positions: torch.Tensor) -> np.ndarray:
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

    def _plan(self, variant: int) -> np.ndarray:
        """Offsets of each sequence's rows in a variant: its cached positions, counted by masking
        every sequence the way a training or validation batch does."""
        sequences = self._sequences["val" if variant == data.VALIDATION_VARIANT else "train"]
        m = self.manifest
        if m["distill_positions"] == "all":
            counts = data.token_lengths(sequences, m["max_seq_len"])
        else:
            counts, tokenizer = [], self.tokenizer
            for start in range(0, len(sequences), 512):
                batch = data.masked_batch(
                    sequences,
                    range(start, min(start + 512, len(sequences))),
                    tokenizer,
                    m["max_seq_len"],
                    m["mask_prob"],
                    m["mask_seed"],
                    variant,
                )
                counts += (batch["labels"] != data.IGNORE_INDEX).sum(dim=1).tolist()
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _resume_fill(self, variant: int) -> "_Fill":
        """Open a variant for writing: continue its partial file when its progress is on disk,
        else start it afresh."""
        if self._lock is None:
            raise RuntimeError("call start_filling before writing to a teacher cache")
        offsets = self._plan(variant)
        shape = (int(offsets[-1]), self.manifest["vocab_size"])
        partial, progress = self._file(variant, "logits.partial.npy"), self._file(variant, "filled.npy")
        fill = None
        if partial.is_file() and progress.is_file():
            try:
                logits, filled = np.load(partial, mmap_mode="r+"), np.load(progress)
                if logits.shape == shape and logits.dtype == np.float16 and filled.shape == (len(offsets) - 1,):
                    fill = _Fill(offsets, logits, filled)
            except (OSError, ValueError):  # a damaged partial file: refill the variant
                pass
        if fill is None:
            progress.unlink(missing_ok=True)
            logits = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape)
            _reserve_disk(partial)
            fill = _Fill(offsets, logits, np.zeros(len(offsets) - 1, dtype=bool))
        self._fills[variant] = fill
        return fill

    def _complete(self, variant: int, fill: "_Fill") -> None:
        fill.logits.flush()
        with atomic_open(self._file(variant, "offsets.npy")) as f:
            np.save(f, fill.offsets)
        os.replace(self._file(variant, "logits.partial.npy"), self._file(variant, "logits.npy"))
        del self._fills[variant]
        self.manifest["complete"][self._part(variant)] = {
            "sequences": len(fill.filled),
            "positions": int(fill.offsets[-1]),
        }
        self._write_manifest()
        self._file(variant, "filled.npy").unlink(missing_ok=True)

    def _open_complete(self, variant: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            logits = np.load(self._file(variant, "logits.npy"), mmap_mode="r")
            offsets = np.load(self._file(variant, "offsets.npy"))
        except (OSError, ValueError) as err:
            raise UserError(
                f"teacher cache {self.directory}: variant {self._part(variant)} is marked complete "
                f"but cannot be read ({err}); delete the folder and fill it again"
            ) from err
        if logits.shape != (offsets[-1], self.manifest["vocab_size"]):
            raise UserError(
                f"teacher cache {self.directory}: {self._part(variant)}.logits.npy has shape "
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

    def _write_manifest(self) -> None:
        with atomic_open(self.directory / MANIFEST, "w") as f:
            f.write(json.dumps(self.manifest, indent=2) + "\n")

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / ".lock", "w")
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; one filling process at a time is up to the user
            return
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UserError(
                f"teacher cache {self.directory} is being filled by another process; wait for it, "
                "or pass another --teacher_cache folder"
            ) from None


def _reserve_disk(path: Path) -> None:
    """Allocate a new (sparse) file's blocks now: a full disk is then an error here, not a crash
    (SIGBUS) at some later write through the memory map."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:  # other errors: a filesystem that cannot reserve; the map allocates as it goes
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(
                    f"{path}: no room for the {size / 2**20:.0f} MB of this teacher cache variant "
                    f"({err.strerror}); free some space or pass another --teacher_cache folder"
                ) from None


class _Fill:
    """A variant being written: its row offsets, its partial logits file and which sequences are in."""

    def __init__(self, offsets: np.ndarray, logits: np.memmap, filled: np.ndarray):
        self.offsets, self.logits, self.filled = offsets, logits, filled
