"""Filling a teacher cache: the fill lock, each variant's row plan, its partial file (continued
after a kill, its disk reserved up front), the writes, flushes and the rename into place.

teacher_cache.TeacherCache.start_filling makes the writer; the cache delegates its writing
methods to it (see teacher_cache.py for the files)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from pepemb import data
from pepemb.cli import UserError
from pepemb.files import atomic_open

if TYPE_CHECKING:
    from pepemb.teacher_cache import TeacherCache


@dataclass
class _Fill:
    """A variant being written: its row offsets, its partial logits file and which sequences are in."""

    offsets: np.ndarray
    logits: np.memmap
    filled: np.ndarray


class CacheWriter:
    """Writes the variants of one cache, holding its folder's lock (`take_lock`) until closed.
    `sequences` are the training and validation sequences the cache is filled for."""

    def __init__(self, cache: TeacherCache, lock):
        self.cache, self.lock = cache, lock
        self.sequences: dict[str, Sequence[str]] = {}
        self._fills: dict[int, _Fill] = {}

    def is_filled(self, variant: int, indices: Sequence[int]) -> bool:
        """Whether these sequences of an incomplete variant are written (filled and flushed)."""
        return bool(self._fill(variant).filled[list(indices)].all())

    def write(self, variant: int, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch's teacher logits [B, L, V] at the cached positions; returns the logits
        rounded to fp16 and back, which is what a read will give."""
        fill, cache = self._fill(variant), self.cache
        positions = cache.positions(batch)
        rounded = logits.to(torch.float16)
        values = rounded[positions]
        if not torch.isfinite(values).all():
            raise UserError(
                f"teacher cache {cache.directory}: the teacher's logits are not finite in fp16 "
                f"(largest magnitude {logits[positions].abs().max().item():.3g}); train without "
                "--teacher_cache"
            )
        indices = batch["sequence_index"].tolist()
        fill.logits[cache.rows(fill.offsets, indices, positions)] = values.cpu().numpy()
        fill.filled[indices] = True
        if fill.filled.all():
            self._complete(variant, fill)
        return rounded.to(logits.dtype)

    def flush(self) -> None:
        """Make what has been written durable: the logits first, then the record of which
        sequences they cover, so that a record never claims logits that were lost."""
        for variant, fill in self._fills.items():
            fill.logits.flush()
            with atomic_open(self.cache.file(variant, "filled.npy")) as f:
                np.save(f, fill.filled)

    def close(self) -> None:
        """Drop the open variants and the lock (without flushing: call flush first to keep progress)."""
        self._fills.clear()
        self.lock.close()

    def _plan(self, variant: int) -> np.ndarray:
        """Offsets of each sequence's rows in a variant: its cached positions, counted by masking
        every sequence the way a training or validation batch does."""
        sequences = self.sequences["val" if variant == data.VALIDATION_VARIANT else "train"]
        m = self.cache.manifest
        if m["distill_positions"] == "all":
            counts = data.token_lengths(sequences, m["max_seq_len"])
        else:
            counts, tokenizer = [], self.cache.tokenizer
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

    def _fill(self, variant: int) -> _Fill:
        """A variant open for writing: continued from its partial file when its progress is on
        disk, else started afresh."""
        if variant in self._fills:
            return self._fills[variant]
        offsets = self._plan(variant)
        shape = (int(offsets[-1]), self.cache.manifest["vocab_size"])
        partial, progress = self.cache.file(variant, "logits.partial.npy"), self.cache.file(variant, "filled.npy")
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

    def _complete(self, variant: int, fill: _Fill) -> None:
        """Offsets written, the logits renamed into place, then (only then) the manifest says so."""
        cache = self.cache
        fill.logits.flush()
        with atomic_open(cache.file(variant, "offsets.npy")) as f:
            np.save(f, fill.offsets)
        os.replace(cache.file(variant, "logits.partial.npy"), cache.file(variant, "logits.npy"))
        del self._fills[variant]
        cache.manifest["complete"][cache.part(variant)] = {
            "sequences": len(fill.filled),
            "positions": int(fill.offsets[-1]),
        }
        cache.write_manifest()
        cache.file(variant, "filled.npy").unlink(missing_ok=True)


def take_lock(directory: Path):
    """The advisory lock on directory/.lock (the folder made if need be), held while the returned
    file is open: one filling process at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / ".lock", "w")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one filling process at a time is up to the user
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(
            f"teacher cache {directory} is being filled by another process; wait for it, "
            "or pass another --teacher_cache folder"
        ) from None
    return lock


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
