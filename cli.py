"""One way for every script to report a user's mistake: a single clear line, exit code 2.

Scripts raise `UserError` (or a `CheckpointError` from architecture.py) for anything the user
can fix: a missing file, a bad flag combination, a foreign checkpoint. `run(main)` turns those
into `error: <message>` on stderr and exit status 2, with no traceback. Genuine bugs still
raise with a full traceback, which is what a developer needs.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from architecture import CheckpointError


class UserError(Exception):
    """A problem the user can fix; the message must say what is wrong and, ideally, what to do."""


USER_ERRORS = (UserError, CheckpointError)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit: 0 on success, 2 on a user error, 130 on Ctrl-C."""
    try:
        status = main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
