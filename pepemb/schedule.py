"""The optimizer's parameter groups, the learning-rate schedules and the plan of optimizer steps."""

from __future__ import annotations

import math

import torch

from pepemb.distributed import optimizer_steps


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
