"""Progress for people and for log files: tqdm bars on a terminal; in a file (nohup, SLURM, CI)
plain lines, at most one every PLAIN_EVERY_S seconds and one at the end, that less, grep and
tail -f can read. Also quiets transformers' and huggingface_hub's own bars and info chatter when
not on a terminal (their warnings still show)."""

from __future__ import annotations

import os
import sys
import time

PLAIN_EVERY_S = 30.0


def is_terminal(stream=None) -> bool:
    """Whether progress goes to a terminal (stderr, where tqdm writes, by default)."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def quiet_libraries() -> None:
    """Not on a terminal: no transformers / huggingface_hub progress bars, transformers logs at
    warning level. Environment variables, read when those libraries are imported (later: every
    script imports them lazily), and applied now to any already imported."""
    if is_terminal():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's interface (iteration, update, set_postfix, close, with) writing plain lines: one at
    most every `every_s` seconds (never, with None) and one at close, each with the count done,
    the total, the rate and the time left."""

    def __init__(
        self,
        iterable=None,
        total=None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        every_s: float | None = PLAIN_EVERY_S,
        stream=None,
        **_ignored,
    ):
        self.iterable, self.desc, self.unit, self.disable, self.every_s = iterable, desc, unit, disable, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = initial
        self.stream = stream or sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.every_s is not None and now - self.last >= self.every_s:
            self.last = now
            self.write_line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = {"": text}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial:  # a loop that did nothing (failed at once) says nothing
                self.write_line(final=True)

    def write_line(self, final: bool = False) -> None:
        if self.disable:
            return
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        parts = [
            f"{self.desc}: {count} {self.unit}" + (" (done)" if final else ""),
            f"{rate:.3g} {self.unit}/s",
            f"{format_seconds(elapsed)} elapsed",
        ]
        if self.total and rate > 0 and not final:
            parts.append(f"~{format_seconds((self.total - self.n) / rate)} left")
        parts += [f"{k} {v}" if k else str(v) for k, v in self.postfix.items()]
        print(" | ".join(parts), file=self.stream, flush=True)


def progress(iterable=None, *, plain_every_s: float | None = PLAIN_EVERY_S, **kwargs):
    """A tqdm bar on a terminal; elsewhere a PlainProgress (plain_every_s None: only the final line)."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return PlainProgress(iterable, every_s=plain_every_s, **kwargs)
