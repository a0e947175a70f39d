"""One optimizer step of distillation: each micro-batch's teacher targets, student forward, loss
and backward, then the update. distill.py trains with these; bench/bench_distill.py and
bench/profile_distill.py time them, phase by phase, through `lap`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pepemb.devices import autocast
from pepemb.distributed import SINGLE_PROCESS, World, average_gradients, gradient_sync
from pepemb.losses import LossWeights, add_to_window, loss_terms, masked_metrics
from pepemb.relations import ProjectionCapture


def no_lap(phase: str) -> None:
    """The default `lap`: a step's phases go untimed."""


@dataclass
class StudentTrainer:
    """A student and what trains it: the hidden-state projection (--hidden_weight), the
    optimizer, its schedule and gradient scaler, the loss weights and KL positions, the clipping
    norm (0: none), the device and autocast dtype (None: fp32) and this process's place in the
    job. `model` is what the forward pass goes through: the student itself (the default), its
    DistributedDataParallel wrapper or its torch.compile'd form."""

    student: torch.nn.Module
    hidden_proj: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    weights: LossWeights
    distill_positions: str
    max_grad_norm: float
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    world: World = SINGLE_PROCESS
    model: torch.nn.Module | None = None
    residue_ids: torch.Tensor | None = None  # the 20 standard residues' token ids (--llr_weight)
    relations: ProjectionCapture | None = None  # the student layer's q, k, v (--relation_weight)

    def __post_init__(self):
        if self.model is None:
            self.model = self.student

    @property
    def trainable(self) -> list[torch.nn.Module]:
        return [self.student] + ([self.hidden_proj] if self.hidden_proj is not None else [])


def batch_targets(
    trainer: StudentTrainer, batch: dict, targets, variant: int, reads_teacher: bool, lap: Callable = no_lap
) -> tuple[dict, dict]:
    """(the batch on the trainer's device, the teacher's outputs for it from `targets`, a
    teacher_targets.TeacherTargets); without `reads_teacher` (plain masked LM) no logits."""
    batch = {k: v.to(trainer.device, non_blocking=True) for k, v in batch.items()}
    lap("to device")
    t = targets(batch, variant) if reads_teacher else {"logits": None}
    lap("teacher targets")
    return batch, t


def student_backward(
    trainer: StudentTrainer,
    batch: dict,
    t: dict,
    last_micro_batch: bool = True,
    micro_batches: int = 1,
    lap: Callable = no_lap,
) -> tuple[dict, dict]:
    """The student's part of a micro-batch on the teacher's outputs t: forward, loss terms and the
    backward pass of loss / micro_batches (gradients summed over the step's micro-batches; under
    DDP all-reduced in the last one's). Returns (student outputs, loss terms)."""
    with gradient_sync(trainer.model, last_micro_batch=last_micro_batch):
        with autocast(trainer.device, trainer.autocast_dtype):
            out = trainer.model(
                batch["input_ids"],
                batch["attention_mask"],
                output_hidden_states=trainer.hidden_proj is not None,
                output_embedding=trainer.student.teacher_map is not None,
            )
            lap("student forward")
            terms = loss_terms(
                out,
                trainer.hidden_proj,
                t["logits"],
                t.get("hidden_states"),
                batch,
                trainer.weights,
                distill_positions=trainer.distill_positions,
                t_embedding=t,
                residue_ids=trainer.residue_ids,
                student_qkv=trainer.relations.take() if trainer.relations is not None else None,
                teacher_qkv=t.get("relations"),
            )
        lap("loss")
        # A non-finite loss goes backward too, to be dropped with its step by the caller:
        # under DDP every rank must take part in the gradient all-reduce.
        trainer.scaler.scale(terms["loss"] / micro_batches).backward()
        lap("backward")
    return out, terms


def forward_backward(
    trainer: StudentTrainer,
    batch: dict,
    targets,
    variant: int,
    reads_teacher: bool,
    window: dict,
    last_micro_batch: bool = True,
    micro_batches: int = 1,
    lap: Callable = no_lap,
) -> bool:
    """One micro-batch of mask variant `variant`: teacher targets, student forward, loss, backward;
    adds it to the log window (losses.add_to_window). Returns whether its loss was finite.
    `lap(phase)` is called as each phase ends."""
    batch, t = batch_targets(trainer, batch, targets, variant, reads_teacher, lap)
    out, terms = student_backward(trainer, batch, t, last_micro_batch, micro_batches, lap)
    add_to_window(window, batch, masked_metrics(out["logits"].detach(), t["logits"], batch["labels"]), terms)
    lap("metrics + window sums")
    return bool(torch.isfinite(terms["loss"]))


def accumulate_gradients(
    trainer: StudentTrainer, batches, count: int, targets, variant: int, reads_teacher: bool, window: dict
) -> bool:
    """forward_backward over the `count` micro-batches of one optimizer step (gradients summed,
    DDP's all-reduce in the last one's backward). Returns whether every loss was finite."""
    loss_ok = True
    for j, batch in enumerate(batches):
        loss_ok &= forward_backward(
            trainer,
            batch,
            targets,
            variant,
            reads_teacher,
            window,
            last_micro_batch=j == count - 1,
            micro_batches=count,
        )
    return loss_ok


def optimizer_step(trainer: StudentTrainer, lap: Callable = no_lap) -> None:
    """Average the projection's gradients over the ranks (DDP does the student's), clip, step,
    update the scaler and the schedule, clear the gradients (skip_step: a step not taken)."""
    if trainer.hidden_proj is not None:
        average_gradients(trainer.hidden_proj, trainer.world)
    if trainer.max_grad_norm > 0:
        trainer.scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_([p for m in trainer.trainable for p in m.parameters()], trainer.max_grad_norm)
    lap("clip")
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    lap("optimizer")
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    lap("schedule + zero_grad")


def skip_step(trainer: StudentTrainer) -> None:
    """Drop a step whose loss was not finite (on any rank): clear its gradients, which would
    poison the weights, and under fp16 back the loss scale off as GradScaler.update() does after
    an overflow.

    The standard fp16 loop goes through scaler.step, which skips the update when the scaled
    gradients hold an inf or NaN, and scaler.update(), which then multiplies the scale by
    backoff_factor and restarts its count of good steps (the growth tracker). A step skipped here
    reaches neither, so the scale would stay put and the count go on towards the next doubling.
    update() itself cannot be called: it needs the inf check that unscale_ records, and whether
    this rank's gradients hold an inf is not what decided the skip (any rank's loss did). So the
    state is set as update() sets it on an overflow, on every rank alike. The scale does not enter
    the forward pass: a loss that overflows there overflows again, and --max_bad_steps still ends
    such a run. In fp32 and bf16 the scaler is disabled: only the gradients are cleared."""
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.scaler.is_enabled():
        state = trainer.scaler.state_dict()
        backed_off = {**state, "scale": state["scale"] * state["backoff_factor"], "_growth_tracker": 0}
        trainer.scaler.load_state_dict(backed_off)
