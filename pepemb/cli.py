"""One way for every script to report a user's mistake: a single clear line, exit code 2.

Scripts raise `UserError` (or a `CheckpointError` from architecture.py) for anything the user
can fix: a missing file, a bad flag combination, a foreign checkpoint. `run(main)` turns those
into `error: <message>` on stderr and exit status 2, with no traceback. Genuine bugs still
raise with a full traceback, which is what a developer needs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from architecture import CheckpointError
from pepemb.progress import quiet_libraries


class UserError(Exception):
    """A problem the user can fix; the message must say what is wrong and, ideally, what to do."""


USER_ERRORS = (UserError, CheckpointError)


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """`path`, once it is known to be a folder this process can write in, or one it can create.

    Checked before any work and without creating anything, so that a run stopped by a later error
    leaves no empty folder behind; `flag` names the argument in the message ("--output_dir").
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UserError(f"{flag} {path} {where}; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {existing}")
    return path


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit: 0 on success, 2 on a user error, 130 on Ctrl-C. Output sent
    to a file gets no library progress bars (progress.quiet_libraries)."""
    quiet_libraries()
    try:
        status = main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
