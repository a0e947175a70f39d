"""The optimizer's parameter groups, the learning-rate schedules and the plan of optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pepemb.distributed import optimizer_steps


@dataclass(frozen=True)
class Optimization:
    """AdamW's peak learning rate and weight decay, the warmup steps, the decay after them
    ("linear" or "cosine") and the wall-clock budget in minutes (None: the schedule runs over
    steps), as distill.py's optimisation flags of these names give them."""

    learning_rate: float
    weight_decay: float = 0.01
    warmup_steps: int = 100
    scheduler: str = "linear"
    max_time: float | None = None


def optimizer_and_schedule(
    modules, optimization: Optimization, device: torch.device, total_steps: int, elapsed_s: Callable[[], float]
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the modules' adamw_param_groups and its learning-rate schedule: over the steps
    (step_schedule), or with a budget over the share of it used (budget_schedule; elapsed_s() is
    the run's clock)."""
    o = optimization
    # fused: one kernel for the whole update instead of one per parameter (2-3x faster step on CPU)
    optimizer = torch.optim.AdamW(
        adamw_param_groups(modules, o.weight_decay), lr=o.learning_rate, fused=device.type in ("cpu", "cuda")
    )
    if not o.max_time:
        return optimizer, step_schedule(optimizer, o.warmup_steps, o.scheduler, total_steps)
    budget_s = o.max_time * 60

    # The share of the wall-clock budget, or of the steps where --max_steps (or --num_epochs)
    # ends the run first: the learning rate reaches 0 at whichever limit stops it.
    def used(step: int) -> float:
        return max(elapsed_s() / budget_s, step / total_steps)

    return optimizer, budget_schedule(optimizer, o.warmup_steps, o.scheduler, used)


def adamw_param_groups(modules, weight_decay: float):
    """Decay matrices only; biases, LayerNorm and embedding-free 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def budget_schedule(optimizer, warmup_steps: int, kind: str, budget_fraction) -> torch.optim.lr_scheduler.LambdaLR:
    """--max_time's schedule: linear warmup over steps, then linear (or cosine) decay to 0 as
    budget_fraction(step) -- the share of the budget used -- goes from 0 to 1."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        used = min(max(budget_fraction(step), 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * used)) if kind == "cosine" else 1.0 - used

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def planned_steps(n_batches: int, position: dict, batches_per_step: int, world_size: int, num_epochs: int) -> int:
    """Optimizer steps of the whole run: an epoch's x --num_epochs. A run resumed with another
    global batch (processes x accumulation) than its checkpoint's counts the steps left from the
    checkpoint's position instead, so that it still ends after --num_epochs."""
    if position.get("batches_per_step", batches_per_step) == batches_per_step:
        return num_epochs * len(optimizer_steps(n_batches, 0, batches_per_step, world_size))
    return position["step"] + sum(
        len(
            optimizer_steps(
                n_batches, position["batch"] if epoch == position["epoch"] else 0, batches_per_step, world_size
            )
        )
        for epoch in range(position["epoch"], num_epochs)
    )


def step_schedule(optimizer, warmup_steps: int, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over steps: linear warmup, then linear (or cosine) decay to 0 at total_steps."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make_schedule = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make_schedule(optimizer, min(warmup_steps, total_steps), total_steps)
