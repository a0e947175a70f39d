"""File helpers every script shares: atomic writes that never leave half a file behind, and
safe, distinct file names made from sequence ids."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


def _create_beside(path: Path) -> tuple[int, Path]:
    """(descriptor, name) of a new, empty hidden file `.NAME.XXXXXXXX.tmp` beside `path`, made
    with mode 0666 less the umask at this moment, as open() makes files (mkstemp's are 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def current_umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(paths) -> None:
    """Give files 0666 and folders 0777 less the umask, the modes open() and mkdir() give: for
    what libraries write private (safetensors' save_file: 0600) or tempfile.mkdtemp makes (0700)."""
    mask = current_umask()
    for path in paths:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write through a temp file beside `path`, fsync'd and renamed over `path` only when the
    block succeeds: readers (and a resumed run after kill -9) never see half a file. The file
    gets the mode open() would give it (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = _create_beside(path)
    try:
        with os.fdopen(handle, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
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
