"""Distil a HuggingFace masked-LM teacher (ProtBert by default) into a small RoPE student.

    python distill.py --data_path data/unref_50 --output_dir checkpoints \
        --teacher_model Rostlab/prot_bert --d_model 384 --num_heads 6 --num_layers 4 \
        --distill_weight 0.5 --task_weight 0.5 --batch_size 32 --max_seq_len 512 \
        --learning_rate 5e-5 --num_epochs 10 --fp16 --use_wandb

Loss on masked positions (masked LM at --mask_prob):
    distill_weight * T^2 * KL(softmax(t/T) || softmax(s/T))  +  task_weight * CE(s, true residue)
    [+ hidden_weight * (1 - cos(proj(student_hidden), teacher_hidden))]
    [+ embedding_weight * |map(student embedding) - teacher embedding|^2 / variance: 1 - R^2 per protein]

The script reads top to bottom, like nanoGPT's train.py: set_up (data, teacher, student,
optimizer, output folder), train_loop (the optimizer steps) and finish (final evaluation,
checkpoint, summary); the modules it imports each do one job (README: Shared modules). Every batch is rebuilt from
(seed, epoch, batch index) and checkpoints hold every RNG, so `--resume` continues exactly.
Each sequence's crop and mask come from (seed, mask variant, sequence index) alone: epoch e
uses variant e (fresh masks every epoch), validation a fixed one.

With --teacher_cache DIR the teacher runs once per (mask variant, sequence): epoch e uses
variant e mod --mask_variants, the first K epochs store the teacher's logits in DIR as they are
computed and later epochs, and later runs with the same data and masking, read them instead
(see pepemb/teacher_cache.py; cache_teacher.py fills DIR ahead of training).

Several GPUs or machines: `torchrun --nproc_per_node N distill.py ...` (DistributedDataParallel;
nccl on CUDA, gloo on CPU). Every rank builds the same epoch of batches and takes every N-th
batch of each optimizer step, so a step trains on N x --grad_accumulation_steps batches (the
global batch; the learning rate is not scaled for you), the same batches as one process
accumulating N x as many. Each rank runs its own frozen copy of the teacher; rank 0 alone
prints, logs and writes checkpoints, which hold the position in the global list of batches and
so resume on any number of processes. A cache is read by every rank but filled only by one
process (or by cache_teacher.py under torchrun).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from architecture import Student, StudentConfig, save_student
from pepemb import cli, data
from pepemb.checkpoints import (
    check_output_dir,
    list_checkpoints,
    read_checkpoint,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
    start_output_dir,
)
from pepemb.cli import UserError
from pepemb.data import MaskedBatches, batch_loader
from pepemb.devices import autocast, resolve_device, resolve_precision
from pepemb.distributed import (
    World,
    all_reduce,
    average_gradients,
    barrier,
    gradient_sync,
    join_world,
    optimizer_steps,
    run_as_rank,
    seed_dropout,
)
from pepemb.losses import TERMS, WINDOW_SUMS, add_to_window, loss_terms, masked_metrics
from pepemb.monitoring import RunLog, plot_training_curves, start_wandb
from pepemb.options import (
    add_distill_arguments,
    loss_weights,
    masking,
    teacher_source,
    training_sequences,
    validate_shared_args,
    validate_training_args,
)
from pepemb.progress import format_seconds, is_terminal, progress
from pepemb.schedule import adamw_param_groups, budget_schedule, planned_steps, step_schedule
from pepemb.signals import StopRequest
from pepemb.teacher_targets import TeacherTargets, load_teacher_targets
from pepemb.validation import ValidationTeacher, validate

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_distill_arguments(p)
    return p


def validate_args(args) -> None:
    """Every flag problem, found before any model is loaded."""
    validate_shared_args(args)
    validate_training_args(args)


# --------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, epoch, index), every mask of (seed, variant, sequence)
# --------------------------------------------------------------------------------------------


def teacher_in_loss(args) -> bool:
    """Whether training reads the teacher; plain masked-LM training needs it for evaluation only."""
    return args.distill_weight > 0 or args.hidden_weight > 0 or args.embedding_weight > 0


def mask_variant(epoch: int, args) -> int:
    """The training masks of an epoch: one of K when a teacher cache serves the training loss,
    otherwise fresh ones each epoch (masked-LM training with a cache reads only its validation part)."""
    return epoch % args.mask_variants if args.teacher_cache and teacher_in_loss(args) else epoch


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(args) -> dict | None:
    """Run a distillation in this process, alone or as one rank of a torchrun job. Returns the
    summary (also written to output_dir/summary.json); None on ranks other than 0."""
    validate_args(args)
    world, device = join_world(resolve_device(args.device), args.dist_timeout)
    return run_as_rank(world, training_run, args, world, device)


def training_run(args, world: World, device: torch.device) -> dict | None:
    """The training run of train(), on this process's device and share of the data."""
    run = set_up(args, world, device)
    stopped_by = train_loop(run)
    return finish(run, stopped_by)


@dataclass
class Run:
    """One training run on this process: what the loop and the steps around it share."""

    args: argparse.Namespace
    world: World
    device: torch.device
    autocast_dtype: torch.dtype | None
    output_dir: Path
    targets: TeacherTargets
    train_seqs: list[str]
    student: Student
    hidden_proj: torch.nn.Module | None
    first_epoch: MaskedBatches
    val_set: MaskedBatches
    position: dict  # step, epoch, next batch (counted over all ranks), best val loss, elapsed
    total_steps: int
    start_time: float
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LRScheduler = None
    scaler: torch.amp.GradScaler = None
    ddp_student: torch.nn.Module = None
    log: RunLog = None
    val_teacher: ValidationTeacher = None
    metadata: dict = field(default_factory=dict)
    saved_steps: list[int] = field(default_factory=list)
    last_eval: tuple[int, dict] | None = None
    first_step: int = 0  # where this process's loop started, and when: the time-left estimate
    loop_start: float = 0.0

    @property
    def trainable(self) -> list[torch.nn.Module]:
        return [self.student] + ([self.hidden_proj] if self.hidden_proj is not None else [])

    @property
    def batches_per_step(self) -> int:
        """An optimizer step takes one micro-batch per rank per accumulation step: the global batch."""
        return self.world.size * self.args.grad_accumulation_steps

    def train_batches(self, epoch: int) -> MaskedBatches:
        if epoch == 0:
            return self.first_epoch
        return MaskedBatches(
            self.train_seqs,
            self.targets.tokenizer,
            masking(self.args),
            epoch,
            train=True,
            mask_variant=mask_variant(epoch, self.args),
        )

    def evaluate(self, step: int) -> dict:
        """Validate, log the record, keep best_model/ when the validation loss improved."""
        metrics = validate(
            self.student,
            self.hidden_proj,
            self.val_teacher,
            self.val_set,
            loss_weights(self.args),
            self.device,
            self.autocast_dtype,
            self.world,
        )
        self.log.write({"split": "val", "step": step, "epoch": self.position["epoch"], **metrics})
        if metrics["loss"] < self.position["best_val_loss"]:
            self.position["best_val_loss"] = metrics["loss"]
            if self.world.is_main:
                save_student(
                    self.student, self.output_dir / "best_model", {**self.metadata, "step": step, "val": metrics}
                )
        self.last_eval = (step, metrics)
        return metrics

    def checkpoint(self) -> Path:
        """Rank 0 writes checkpoint-STEP/ (unless this run saved this very step already); the other
        ranks wait for it."""
        step = self.position["step"]
        path = self.output_dir / f"checkpoint-{step}"
        saved_already = self.saved_steps and self.saved_steps[-1] == step and path in list_checkpoints(self.output_dir)
        if self.world.is_main and not saved_already:
            self.saved_steps.append(step)
            if self.targets.cache is not None:  # the cache entries written so far survive with the checkpoint
                self.targets.cache.flush()
            save_checkpoint(
                self.output_dir,
                self.student,
                self.hidden_proj,
                self.optimizer,
                self.scheduler,
                self.scaler,
                dict(self.position),
                {**self.metadata, "step": step},
                self.args.keep_last,
            )
        barrier(self.world)  # no rank goes on, or exits, before the checkpoint is complete
        return path


def set_up(args, world: World, device: torch.device) -> Run:
    """Data, teacher, student, optimizer and output folder, resumed from a checkpoint if asked."""
    output_dir = check_output_dir(args.output_dir, args.resume, args.overwrite)
    resume_from = resolve_resume(args.resume, output_dir)
    autocast_dtype = resolve_precision(args.fp16, args.bf16, device)

    train_seqs, val_seqs = training_sequences(args)
    variants = {data.VALIDATION_VARIANT} | (
        {mask_variant(e, args) for e in range(args.num_epochs)} if teacher_in_loss(args) else set()
    )
    targets = load_teacher_targets(
        teacher_source(args),
        masking(args),
        train_seqs,
        val_seqs,
        device,
        variants=variants,
        half=autocast_dtype is not None and device.type == "cuda",
        hidden_states=args.hidden_weight > 0,
        fill_cache=world.size == 1,
        embeddings=args.embedding_weight > 0,
    )
    # The crop the teacher takes, in every later use and record of the arguments (the caller's stay as given).
    args = argparse.Namespace(**{**vars(args), "max_seq_len": targets.max_seq_len})
    tokenizer, about = targets.tokenizer, targets.about
    if args.teacher_cache and args.num_epochs < args.mask_variants:
        print(
            f"note: {args.num_epochs} epochs use {args.num_epochs} of the --mask_variants {args.mask_variants} "
            "mask variants; a longer run fills the others"
        )

    torch.manual_seed(args.seed)
    config = StudentConfig.from_tokenizer(
        tokenizer,
        d_model=args.d_model,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        d_ff=args.d_ff,
        dropout=args.dropout,
        teacher_hidden_size=about["hidden_size"] if args.embedding_weight else None,
    )
    student = Student(config).to(device)
    hidden_proj = torch.nn.Linear(args.d_model, about["hidden_size"]).to(device) if args.hidden_weight > 0 else None
    print(f"student: {student.summary()}; compression {about['num_parameters'] / student.num_parameters():.1f}x")

    first_epoch = MaskedBatches(train_seqs, tokenizer, masking(args), 0, train=True, mask_variant=mask_variant(0, args))
    val_set = MaskedBatches(val_seqs, tokenizer, masking(args), epoch=0, train=False)
    if len(first_epoch) < world.size:
        raise UserError(
            f"the training split makes {len(first_epoch)} batches, too few for {world.size} processes: "
            "lower --batch_size (or --max_tokens), or start fewer processes"
        )
    batches_per_step = world.size * args.grad_accumulation_steps
    position = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_val_loss": math.inf,
        "elapsed_s": 0.0,
        "batches_per_step": batches_per_step,
    }  # "batch": the epoch's next batch, counted over all ranks
    if resume_from is not None:
        weights, state = read_checkpoint(resume_from, config)
        position = dict(state["position"])
    total_steps = planned_steps(len(first_epoch), position, batches_per_step, world.size, args.num_epochs)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    budget = f"; at most {args.max_time:g} min" if args.max_time else ""
    ranks = f" ({world.size} processes x {args.grad_accumulation_steps})" if world.size > 1 else ""
    print(
        f"data: {len(train_seqs)} train / {len(val_seqs)} val sequences, {len(first_epoch)} batches per "
        f"epoch, padding efficiency {first_epoch.padding_efficiency:.3f}; {batches_per_step} batches{ranks} per "
        f"optimizer step, {total_steps} optimizer steps{budget}"
    )

    run = Run(
        args,
        world,
        device,
        autocast_dtype,
        output_dir,
        targets,
        train_seqs,
        student,
        hidden_proj,
        first_epoch,
        val_set,
        position,
        total_steps,
        start_time=time.perf_counter(),
    )
    set_up_optimization(run)
    if resume_from is not None:
        resume(run, resume_from, weights, state)
    set_up_outputs(run, resumed=resume_from is not None)
    return run


def set_up_optimization(run: Run) -> None:
    """AdamW, the learning-rate schedule (over steps, or over the --max_time budget), the scaler."""
    args = run.args
    # fused: one kernel for the whole update instead of one per parameter (2-3x faster step on CPU)
    run.optimizer = torch.optim.AdamW(
        adamw_param_groups(run.trainable, args.weight_decay),
        lr=args.learning_rate,
        fused=run.device.type in ("cpu", "cuda"),
    )
    if args.max_time:
        budget_s = args.max_time * 60
        # The share of the wall-clock budget, or of the steps where --max_steps (or --num_epochs)
        # ends the run first: the learning rate reaches 0 at whichever limit stops it.
        run.scheduler = budget_schedule(
            run.optimizer,
            args.warmup_steps,
            args.scheduler,
            lambda step: max(run.position["elapsed_s"] / budget_s, step / run.total_steps),
        )
    else:
        run.scheduler = step_schedule(run.optimizer, args.warmup_steps, args.scheduler, run.total_steps)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.autocast_dtype == torch.float16)


def resume(run: Run, resume_from: Path, weights: dict, state: dict) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, scaler and RNGs as they were."""
    restore_training_state(
        resume_from, weights, state, run.student, run.hidden_proj, run.optimizer, run.scheduler, run.scaler
    )
    position = run.position
    print(
        f"resumed from {resume_from} at step {position['step']} (epoch {position['epoch']}, batch {position['batch']})"
    )
    if position.get("batches_per_step", run.batches_per_step) != run.batches_per_step:
        print(
            f"note: the checkpoint was written with {position['batches_per_step']} batches per optimizer step, "
            f"this run takes {run.batches_per_step}: the schedule is planned anew for the steps left"
        )
    position["batches_per_step"] = run.batches_per_step


def set_up_outputs(run: Run, resumed: bool) -> None:
    """DDP wrapper, output folder, metrics log, W&B and the validation teacher outputs."""
    args, world, student, about = run.args, run.world, run.student, run.targets.about
    # The teacher stays as it is on every rank: frozen, never wrapped. The student's only buffers
    # are RoPE tables that each rank grows to its longest sequence: not broadcast.
    run.ddp_student = (
        student
        if world.size == 1
        else DDP(
            student, device_ids=[run.device.index] if run.device.type == "cuda" else None, forward_sync_buffers=False
        )
    )
    if world.size > 1:
        seed_dropout(args.seed, run.position["step"], world)
    barrier(world)  # every rank has read the output folder and checkpoint before rank 0 changes them
    if world.is_main:
        start_output_dir(run.output_dir, args.overwrite, run.position["step"] if resumed else None)
    run.start_time -= run.position["elapsed_s"]
    run.metadata = {
        "teacher": about["name"],
        "teacher_vocab_hash": run.targets.tokenizer.vocab_hash,
        "max_seq_len": args.max_seq_len,
        "distill_args": {k: v for k, v in vars(args).items()},
    }
    run.val_teacher = ValidationTeacher(run.targets)
    run_config = {
        **vars(args),
        "student_parameters": student.num_parameters(),
        "processes": world.size,
        "teacher_parameters": about["num_parameters"],
        "teacher_backend": about["backend"],
    }
    wandb_run = (
        start_wandb(args.wandb_project, args.wandb_run_name, args.output_dir, run_config)
        if args.use_wandb and world.is_main
        else None
    )
    run.log = RunLog(run.output_dir / "metrics.jsonl" if world.is_main else None, wandb_run)


def train_loop(run: Run) -> str | None:
    """The optimizer steps, epoch by epoch, until the planned steps, --max_time or a stop signal.
    Returns "non-finite losses" when too many steps in a row had to be skipped, else None; exits
    (after a checkpoint) on SIGINT/SIGTERM."""
    args, world, position, optimizer = run.args, run.world, run.position, run.optimizer
    step, total_steps = position["step"], run.total_steps
    reads_teacher = teacher_in_loss(args)  # else plain masked LM: the teacher serves evaluation only
    window = new_window()
    bad_steps, stopped_by = 0, None
    if step == 0:  # the starting point of the curves: how far the untrained student is from the teacher
        run.evaluate(0)
    # In a log file the bar is silent: log_training writes a line every --log_every steps instead.
    bar = progress(
        total=None if args.max_time else total_steps,
        initial=step,
        desc="distill",
        unit="step",
        disable=not world.is_main,
        plain_every_s=None,
    )
    stop_signum, out_of_time = 0, False  # agreed on by all ranks at every step
    run.first_step, run.loop_start = step, time.perf_counter()
    run.student.train()
    with StopRequest() as stop:
        for epoch in range(position["epoch"], args.num_epochs):
            if step >= total_steps or stop_signum or out_of_time:
                break
            position["epoch"] = epoch
            epoch_set = run.train_batches(epoch)
            steps = optimizer_steps(len(epoch_set), position["batch"], run.batches_per_step, world.size)
            mine = [group[world.rank :: world.size] for group in steps]  # this rank's batches of each step
            micro_batches = iter(batch_loader(epoch_set, [i for part in mine for i in part], args.num_workers))
            optimizer.zero_grad(set_to_none=True)
            for group, part in zip(steps, mine):
                loss_ok = True
                for j, batch in enumerate(islice(micro_batches, len(part))):
                    loss_ok &= forward_backward(
                        run,
                        batch,
                        epoch_set.mask_variant,
                        reads_teacher,
                        window,
                        last_micro_batch=j == len(part) - 1,
                        micro_batches=len(part),
                    )

                position["batch"] = group.stop
                # One all-reduce a step has every rank decide alike: skip the step if any rank's loss
                # is not finite, stop if any rank got a signal, and run the budget on one clock.
                bad, stop_signum, position["elapsed_s"] = all_reduce(
                    [not loss_ok, stop.signum or 0, time.perf_counter() - run.start_time], world, op="max"
                )
                stop_signum = int(stop_signum)
                out_of_time = bool(args.max_time) and position["elapsed_s"] >= args.max_time * 60
                if bad:  # skip the step: a non-finite loss would poison the weights
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps += 1
                    if world.is_main:
                        warnings.warn(
                            f"non-finite loss at step {step + 1}; step skipped ({bad_steps} in a row)", stacklevel=1
                        )
                    if bad_steps >= args.max_bad_steps:
                        stopped_by = "non-finite losses"
                        break
                    continue
                bad_steps = 0
                optimizer_step(run)
                step += 1
                position["step"] = step
                bar.update(1)

                if step % args.log_every == 0 or step == total_steps:
                    record = log_training(run, window, epoch, reads_teacher)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        acc=f"{record['masked_acc']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                    window = new_window()
                if step % args.eval_every == 0:
                    run.evaluate(step)
                if step % args.save_every == 0:
                    run.checkpoint()
                if step >= total_steps or stop_signum or out_of_time:
                    break
            if stopped_by or stop_signum or step >= total_steps or out_of_time:
                break
            position["epoch"], position["batch"] = epoch + 1, 0
            if run.last_eval is None or run.last_eval[0] != step:
                run.evaluate(step)
        bar.close()
        if stop_signum:
            stop_on_signal(run, stop_signum)
    return stopped_by


def forward_backward(
    run: Run, batch: dict, variant: int, reads_teacher: bool, window: dict, last_micro_batch: bool, micro_batches: int
) -> bool:
    """One micro-batch: teacher targets, student forward, loss, backward (gradients summed over
    the step's micro-batches); adds it to the log window. Returns whether its loss was finite."""
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    t = run.targets(batch, variant) if reads_teacher else {"logits": None}
    with gradient_sync(run.ddp_student, last_micro_batch=last_micro_batch):
        with autocast(run.device, run.autocast_dtype):
            out = run.ddp_student(
                batch["input_ids"],
                batch["attention_mask"],
                output_hidden_states=run.hidden_proj is not None,
                output_embedding=run.student.teacher_map is not None,
            )
            terms = loss_terms(
                out,
                run.hidden_proj,
                t["logits"],
                t.get("hidden_states"),
                batch,
                loss_weights(run.args),
                distill_positions=run.args.distill_positions,
                t_embedding=t,
            )
        # A non-finite loss goes backward too, to be dropped with its step by the caller:
        # under DDP every rank must take part in the gradient all-reduce.
        run.scaler.scale(terms["loss"] / micro_batches).backward()
    add_to_window(window, batch, masked_metrics(out["logits"].detach(), t["logits"], batch["labels"]), terms)
    return bool(torch.isfinite(terms["loss"]))


def optimizer_step(run: Run) -> None:
    """Clip, step, update the scaler and the schedule, clear the gradients."""
    if run.hidden_proj is not None:
        average_gradients(run.hidden_proj, run.world)
    if run.args.max_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for m in run.trainable for p in m.parameters()], run.args.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def new_window() -> dict:
    """Empty running sums for the next metrics.jsonl train record, and when they started."""
    return dict.fromkeys(WINDOW_SUMS, 0) | {"t0": time.perf_counter()}


def log_training(run: Run, window: dict, epoch: int, reads_teacher: bool) -> dict:
    """The train record of the window just ended (summed over ranks), written to the log."""
    dt = max(time.perf_counter() - window["t0"], 1e-9)
    sums = dict(zip(WINDOW_SUMS, all_reduce([window[k] for k in WINDOW_SUMS], run.world)))
    m = max(sums["masked"], 1)
    record = {
        "split": "train",
        "step": run.position["step"],
        "epoch": epoch,
        **{k: sums[k] / m for k in TERMS},
        "masked_acc": sums["correct"] / m,
        "agreement": sums["agree"] / m if reads_teacher else None,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": sums["tokens"] / dt,
        "sequences_per_s": sums["seqs"] / dt,
        "elapsed_s": run.position["elapsed_s"],
    }
    run.log.write(record)
    if run.world.is_main and not is_terminal():
        print(progress_line(run, record), flush=True)
    return record


def progress_line(run: Run, record: dict) -> str:
    """One plain line of a train record, for logs (nohup, SLURM, CI) where no bar is drawn."""
    args, step, elapsed = run.args, record["step"], record["elapsed_s"]
    done_here = step - run.first_step
    if args.max_time:
        left = max(args.max_time * 60 - elapsed, 0.0)
    else:
        left = (run.total_steps - step) * (time.perf_counter() - run.loop_start) / max(done_here, 1)
    terms = " ".join(f"{k} {record[k]:.3f}" for k in ("kl", "ce", "cos", "emb") if record.get(k))
    agreement = f" | agree {record['agreement']:.3f}" if record["agreement"] is not None else ""
    return (
        f"step {step:,}/{run.total_steps:,} | epoch {record['epoch']} | loss {record['loss']:.3f} ({terms}) "
        f"| acc {record['masked_acc']:.3f}{agreement} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s "
        f"| {format_seconds(elapsed)} elapsed, ~{format_seconds(left)} left"
    )


def stop_on_signal(run: Run, signum: int) -> None:
    """Checkpoint, say how to resume, and exit 128 + signal number (every rank alike)."""
    path = run.checkpoint()
    run.log.close()
    launcher = "torchrun <same launcher arguments> distill.py" if run.world.size > 1 else "python distill.py"
    if run.world.is_main:
        print(
            f"stopped by {signal.Signals(signum).name} at step {run.position['step']}; checkpoint {path}\n"
            f"resume with: {launcher} <same arguments> --resume auto",
            file=sys.stderr,
        )
    sys.exit(128 + signum)


def finish(run: Run, stopped_by: str | None) -> dict | None:
    """Final evaluation and checkpoint, training curves, summary.json; the summary on rank 0."""
    args, targets, step = run.args, run.targets, run.position["step"]
    if stopped_by:
        run.log.close()
        if targets.cache is not None:
            targets.cache.flush()
        raise UserError(
            f"{args.max_bad_steps} non-finite losses in a row at step {step}: stopping. The last good "
            f"checkpoint is kept in {run.output_dir}; try a lower --learning_rate or fp32"
        )
    final_metrics = run.last_eval[1] if run.last_eval and run.last_eval[0] == step else run.evaluate(step)
    final_checkpoint = run.checkpoint()
    run.log.close()
    if targets.cache is not None:
        targets.cache.close()
    teacher_batches = dict(zip(targets.batches, map(int, all_reduce(list(targets.batches.values()), run.world))))
    if not run.world.is_main:
        return None
    output_dir, about, student = run.output_dir, targets.about, run.student
    plot_training_curves(output_dir / "metrics.jsonl", output_dir / "training_curves.png")
    elapsed = time.perf_counter() - run.start_time
    best = json.loads((output_dir / "best_model" / "config.json").read_text()).get("metadata", {})
    summary = {
        "teacher": about["name"],
        "teacher_backend": about["backend"],
        "device": str(run.device),
        "processes": run.world.size,
        "batches_per_step": run.batches_per_step,
        "precision": str(run.autocast_dtype or torch.float32).replace("torch.", ""),
        "student_parameters": student.num_parameters(),
        "teacher_parameters": about["num_parameters"],
        "compression": about["num_parameters"] / student.num_parameters(),
        "teacher_cache": args.teacher_cache,
        "teacher_loaded": targets.teacher is not None,
        "teacher_batches": teacher_batches,
        "steps": step,
        "elapsed_s": elapsed,
        "final_val": final_metrics,
        "best_val": best.get("val"),
        "best_step": best.get("step"),
        "padding_efficiency": run.first_epoch.padding_efficiency,
        "best_model": str(output_dir / "best_model" / "model.pt"),
        "last_checkpoint": str(final_checkpoint),
        "args": vars(args),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    run.log.finish_wandb(final_metrics)
    print(
        f"done: {step} steps in {elapsed / 60:.1f} min; val masked acc {final_metrics['masked_acc']:.3f} "
        f"(teacher {final_metrics['teacher_masked_acc']:.3f}), agreement {final_metrics['agreement']:.3f}; "
        f"best model {output_dir / 'best_model' / 'model.pt'}"
    )
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    cli.run(main)
