"""The runs the fidelity benchmark compares: the loss variants (VARIANTS), the budgets (wall-clock
minutes or optimizer steps), and what identifies a run in fidelity.json.

Every variant trains the same student on the same data with the same initialisation and learning
rate; only the loss and where the teacher's outputs come from (live, a cache filled before the
run, or one filled during it) differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from student_runs import KD, MLM


@dataclass(frozen=True)
class Variant:
    """One training setup: its distill.py loss flags and where the teacher's outputs come from."""

    name: str
    about: str
    loss: tuple[str, ...]  # distill.py loss flags
    cache: str | None = None  # None: live teacher; "prefilled": by cache_teacher.py before the run; "fill": during it
    positions: str = "masked"  # --distill_positions (what a cache stores)

    @property
    def teacher_in_loss(self) -> bool:
        """Whether training reads the teacher (else it only serves the validation agreement)."""
        extra = ("--hidden_weight", "--llr_weight", "--relation_weight")
        return self.loss[self.loss.index("--distill_weight") + 1] != "0" or any(f in self.loss for f in extra)


@dataclass(frozen=True)
class Budget:
    """What a run may spend: wall-clock minutes (`10`), or optimizer steps (`800steps`). Step
    budgets compare variants whose steps cost the same (masked LM and the cached KD runs) or the
    quality per step of any two, and unlike minutes they are not changed by other jobs on the
    machine, so such runs may share it (--jobs)."""

    minutes: float | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        text = text.strip()
        if text.endswith("steps"):
            steps = int(text[: -len("steps")])
            if steps <= 0:
                raise ValueError
            return cls(steps=steps)
        minutes = float(text)
        if minutes <= 0:
            raise ValueError
        return cls(minutes=minutes)

    @classmethod
    def of(cls, record: dict) -> "Budget":
        return cls(minutes=record.get("budget_min"), steps=record.get("budget_steps"))

    @property
    def label(self) -> str:
        return f"{self.minutes:g} min" if self.minutes is not None else f"{self.steps} steps"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "")

    @property
    def flags(self) -> list[str]:
        return ["--max_time", f"{self.minutes:g}"] if self.minutes is not None else ["--max_steps", str(self.steps)]

    def sort_key(self) -> tuple:
        return (self.minutes is None, self.minutes or 0, self.steps or 0)


VARIANTS = {
    v.name: v
    for v in [
        Variant(
            "mlm",
            "masked LM only: CE on the true residues, fresh masks each epoch, no teacher in training",
            MLM,
        ),
        Variant(
            "mlm-cache",
            "mlm, validation teacher logits read from the prefilled cache (no teacher loaded): "
            "its evaluations cost what kd-cache's do",
            MLM,
            cache="prefilled",
        ),
        Variant("kd", "0.9 KL at T=2 on masked positions + 0.1 CE (the defaults), live teacher", KD),
        Variant(
            "kd-hidden",
            "kd + 0.1 cosine loss to the teacher's last hidden states, live teacher",
            (*KD, "--hidden_weight", "0.1"),
        ),
        Variant("kd-cache", "kd, teacher logits read from a cache filled before the run", KD, cache="prefilled"),
        Variant("kd-cache-fill", "kd, teacher cache empty at the start and filled inside the budget", KD, cache="fill"),
        Variant(
            "kd-cache-all",
            "kd with the KL on every position, prefilled cache",
            (*KD, "--distill_positions", "all"),
            cache="prefilled",
            positions="all",
        ),
        Variant(
            "kd-cache-t1",
            "kd at temperature 1, prefilled cache",
            ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "1"),
            cache="prefilled",
        ),
        Variant(
            "kd-cache-t4",
            "kd at temperature 4, prefilled cache",
            ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "4"),
            cache="prefilled",
        ),
        Variant(
            "kd-cache-llr",
            "kd + 0.1 squared error of the 20 log-likelihood ratios at masked positions (--llr_weight), prefilled cache",
            (*KD, "--llr_weight", "0.1"),
            cache="prefilled",
        ),
        Variant(
            "kd-relation",
            "kd + MiniLMv2 q/k/v relations of the teacher's and the student's last layers, 8 relation heads "
            "(--relation_weight 1), live teacher",
            (*KD, "--relation_weight", "1"),
        ),
        Variant(
            "kd-cache-w0.5",
            "0.5 KL at T=2 + 0.5 CE (the defaults before this benchmark), prefilled cache",
            ("--distill_weight", "0.5", "--task_weight", "0.5", "--temperature", "2"),
            cache="prefilled",
        ),
    ]
}


def size_label(size: int | None) -> str:
    """A training-set size as the table and plots show it: `all` or the chain count."""
    return "all" if size is None else f"{size:,}"


def run_key(record: dict) -> tuple:
    """What identifies a run in fidelity.json: variant, budget, repeat and training-set size."""
    return record["variant"], Budget.of(record), record.get("repeat", 1), record.get("train_size")
