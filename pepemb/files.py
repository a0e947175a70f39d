"""File helpers every script shares: atomic writes that never leave half a file behind, and
safe, distinct file names made from sequence ids."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write through a temp file beside `path`, fsync'd and renamed over `path` only when the
    block succeeds: readers (and a resumed run after kill -9) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes files private (0600); give the usual mode
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_names(ids: Sequence[str], max_chars: int = 80) -> list[str]:
    """A distinct, filesystem-safe name per id (distinct even on case-insensitive filesystems).

    Unsafe characters become '_'; an id that had to change, or whose name is taken (a duplicate
    id, or one differing only in case), gets '-' and 8 hex digits of a hash of (id, occurrence).
    """
    names, taken, seen = [], set(), Counter()
    for id_ in ids:
        occurrence = seen[id_]
        seen[id_] += 1
        base = _UNSAFE.sub("_", id_)[:max_chars].lstrip(".") or "_"
        name, attempt = base, 0
        while name == base and base != id_ or name.lower() in taken:
            digest = hashlib.sha1(f"{id_}\0{occurrence}\0{attempt}".encode()).hexdigest()[:8]
            name, attempt = f"{base}-{digest}", attempt + 1
        taken.add(name.lower())
        names.append(name)
    return names
