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
optimizer, output folder), train_loop (the optimizer steps, each pepemb/training_step.py's
forward_backward and optimizer_step) and finish (final evaluation, checkpoint, summary); the
modules it imports each do one job (README: Shared modules). Every batch is rebuilt from
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
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from architecture import Student, save_student
from pepemb import checkpoints, cli, data, distributed, options, relations
from pepemb.cli import UserError
from pepemb.data import MaskedBatches
from pepemb.devices import compiled, resolve_device, resolve_precision
from pepemb.distributed import World, all_reduce, barrier
from pepemb.fidelity import residue_token_ids
from pepemb.files import atomic_open
from pepemb.losses import WINDOW_SUMS, new_window
from pepemb.monitoring import RunLog, plot_training_curves, progress_line, seconds_left, start_wandb, train_record
from pepemb.progress import is_terminal, progress
from pepemb.schedule import optimizer_and_schedule, planned_steps
from pepemb.signals import StopRequest
from pepemb.teacher_targets import TeacherTargets, load_teacher_targets
from pepemb.training_step import StudentTrainer, accumulate_gradients, optimizer_step, skip_step
from pepemb.validation import ValidationTeacher, validate

# -- Command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    options.add_distill_arguments(p)
    return p


def validate_args(args) -> None:
    """Every flag problem, found before any model is loaded."""
    options.validate_shared_args(args)
    options.validate_training_args(args)


# -- Data: every batch is a pure function of (seed, epoch, index), every mask of (seed, variant, sequence)


def teacher_in_loss(args) -> bool:
    """Whether training reads the teacher; plain masked-LM training needs it for evaluation only."""
    terms = ("distill_weight", "hidden_weight", "embedding_weight", "llr_weight", "relation_weight")
    return any(getattr(args, name) > 0 for name in terms)


def mask_variant(epoch: int, args) -> int:
    """The training masks of an epoch: one of K when a teacher cache serves the training loss,
    otherwise fresh ones each epoch (masked-LM training with a cache reads only its validation part)."""
    return epoch % args.mask_variants if args.teacher_cache and teacher_in_loss(args) else epoch


# -- Training ----------------------------------------------------------------------------------


def train(args) -> dict | None:
    """Run a distillation in this process, alone or as one rank of a torchrun job. Returns the
    summary (also written to output_dir/summary.json); None on ranks other than 0."""
    validate_args(args)
    world, device = distributed.join_world(resolve_device(args.device), args.dist_timeout)
    return distributed.run_as_rank(world, training_run, args, world, device)


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
    output_dir: Path
    targets: TeacherTargets
    trainer: StudentTrainer
    train_seqs: list[str]
    first_epoch: MaskedBatches
    val_set: MaskedBatches
    position: dict  # step, epoch, next batch (counted over all ranks), best val loss, elapsed
    total_steps: int
    start_time: float = field(default_factory=time.perf_counter)  # less the elapsed_s of a resumed run
    log: RunLog = None
    val_teacher: ValidationTeacher = None
    metadata: dict = field(default_factory=dict)
    saved_steps: list[int] = field(default_factory=list)
    last_eval: tuple[int, dict] | None = None
    first_step: int = 0  # where this process's loop started, and when: the time-left estimate
    loop_start: float = 0.0
    # The loop's state: the log window, the non-finite steps in a row, why to stop (agreed by all ranks).
    window: dict = None
    bad_steps: int = 0
    stopped_by: str | None = None
    stop_signum: int = 0
    out_of_time: bool = False

    @property
    def batches_per_step(self) -> int:
        """An optimizer step takes one micro-batch per rank per accumulation step: the global batch."""
        return self.world.size * self.args.grad_accumulation_steps

    def should_stop(self) -> bool:
        """The planned steps are done, a signal came or the --max_time budget is spent."""
        return self.position["step"] >= self.total_steps or bool(self.stop_signum) or self.out_of_time

    def train_batches(self, epoch: int) -> MaskedBatches:
        if epoch == 0:
            return self.first_epoch
        variant = mask_variant(epoch, self.args)
        return MaskedBatches(
            self.train_seqs, self.targets.tokenizer, options.masking(self.args), epoch, True, mask_variant=variant
        )

    def evaluate(self, step: int) -> dict:
        """Validate, log the record, keep best_model/ when the validation loss improved."""
        t = self.trainer
        metrics = validate(
            t.student,
            t.hidden_proj,
            self.val_teacher,
            self.val_set,
            t.weights,
            t.device,
            t.autocast_dtype,
            self.world,
            residue_ids=t.residue_ids,
        )
        self.log.write({"split": "val", "step": step, "epoch": self.position["epoch"], **metrics})
        if metrics["loss"] < self.position["best_val_loss"]:
            self.position["best_val_loss"] = metrics["loss"]
            if self.world.is_main:
                save_student(t.student, self.output_dir / "best_model", {**self.metadata, "step": step, "val": metrics})
        self.last_eval = (step, metrics)
        return metrics

    def checkpoint(self) -> Path:
        """Rank 0 writes checkpoint-STEP/ (unless this run saved this very step already); the other
        ranks wait for it."""
        step, path = self.position["step"], self.output_dir / f"checkpoint-{self.position['step']}"
        saved = self.saved_steps[-1:] == [step] and path in checkpoints.list_checkpoints(self.output_dir)
        if self.world.is_main and not saved:
            self.saved_steps.append(step)
            self.targets.flush()  # the cache entries written so far survive with the checkpoint
            metadata = {**self.metadata, "step": step}
            checkpoints.save_checkpoint(
                self.output_dir, self.trainer, dict(self.position), metadata, self.args.keep_last
            )
        barrier(self.world)  # no rank goes on, or exits, before the checkpoint is complete
        return path


def set_up(args, world: World, device: torch.device) -> Run:
    """Data, teacher, student, optimizer and output folder, resumed from a checkpoint if asked."""
    output_dir = checkpoints.check_output_dir(args.output_dir, args.resume, args.overwrite)
    resume_from = checkpoints.resolve_resume(args.resume, output_dir)
    autocast_dtype = resolve_precision(args.fp16, args.bf16, device)
    train_seqs, val_seqs = options.training_sequences(args)
    targets = set_up_teacher(args, train_seqs, val_seqs, world, device, autocast_dtype)
    # The crop the teacher takes, in every later use and record of the arguments (the caller's stay as given).
    args = argparse.Namespace(**{**vars(args), "max_seq_len": targets.max_seq_len})
    tokenizer, batching = targets.tokenizer, options.masking(args)
    student, hidden_proj = set_up_student(args, tokenizer, targets.about, device)
    first_epoch = MaskedBatches(train_seqs, tokenizer, batching, 0, train=True, mask_variant=mask_variant(0, args))
    val_set = MaskedBatches(val_seqs, tokenizer, batching, epoch=0, train=False)
    if len(first_epoch) < world.size:
        raise UserError(
            f"the training split makes {len(first_epoch)} batches, too few for {world.size} processes: "
            "lower --batch_size (or --max_tokens), or start fewer processes"
        )
    batches_per_step = world.size * args.grad_accumulation_steps
    position = checkpoints.new_position(batches_per_step)
    if resume_from is not None:
        weights, state = checkpoints.read_checkpoint(resume_from, student.config)
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

    trainer = set_up_optimization(args, student, hidden_proj, device, autocast_dtype, world, position, total_steps)
    add_loss_inputs(trainer, args, tokenizer, targets.about["hidden_size"])
    run = Run(args, world, output_dir, targets, trainer, train_seqs, first_epoch, val_set, position, total_steps)
    if resume_from is not None:
        checkpoints.resume(resume_from, weights, state, trainer, position, run.batches_per_step)
    set_up_outputs(run, resumed=resume_from is not None)
    return run


def set_up_teacher(args, train_seqs, val_seqs, world: World, device, autocast_dtype) -> TeacherTargets:
    """The teacher outputs of the mask variants this run reads (validation's, and the training
    epochs' when the teacher is in the loss): from the cache, or the teacher loaded."""
    variants = {data.VALIDATION_VARIANT} | (
        {mask_variant(e, args) for e in range(args.num_epochs)} if teacher_in_loss(args) else set()
    )
    targets = load_teacher_targets(
        options.teacher_source(args),
        options.masking(args),
        train_seqs,
        val_seqs,
        device,
        variants=variants,
        half=autocast_dtype is not None and device.type == "cuda",
        hidden_states=args.hidden_weight > 0,
        fill_cache=world.size == 1,
        embeddings=args.embedding_weight > 0,
        relation_layer=options.relation_layers(args)[0] if args.relation_weight > 0 else None,
    )
    if args.teacher_cache and args.num_epochs < args.mask_variants:
        print(
            f"note: {args.num_epochs} epochs use {args.num_epochs} of the --mask_variants {args.mask_variants} "
            "mask variants; a longer run fills the others"
        )
    return targets


def set_up_student(args, tokenizer, about: dict, device) -> tuple[Student, torch.nn.Module | None]:
    """The student, seeded by --seed, and the projection of its hidden states (--hidden_weight)."""
    torch.manual_seed(args.seed)
    config = options.student_config(args, tokenizer, about["hidden_size"] if args.embedding_weight else None)
    student = Student(config).to(device)
    hidden_proj = torch.nn.Linear(args.d_model, about["hidden_size"]).to(device) if args.hidden_weight > 0 else None
    print(f"student: {student.summary()}; compression {about['num_parameters'] / student.num_parameters():.1f}x")
    return student, hidden_proj


def set_up_optimization(
    args, student, hidden_proj, device, autocast_dtype, world: World, position: dict, total_steps: int
) -> StudentTrainer:
    """AdamW, the learning-rate schedule (over steps, or over the --max_time budget), the scaler."""
    modules = [m for m in (student, hidden_proj) if m is not None]
    optimization = options.optimization(args)
    optimizer, scheduler = optimizer_and_schedule(
        modules, optimization, device, total_steps, elapsed_s=lambda: position["elapsed_s"]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    weights, kl, clip = options.loss_weights(args), args.distill_positions, args.max_grad_norm
    return StudentTrainer(
        student, hidden_proj, optimizer, scheduler, scaler, weights, kl, clip, device, autocast_dtype, world
    )


def add_loss_inputs(trainer: StudentTrainer, args, tokenizer, teacher_width: int) -> None:
    """What the extra loss terms read besides the outputs: the 20 residues' token ids
    (--llr_weight) and the hooks on the student layer whose q, k, v give its relations."""
    if args.llr_weight > 0:
        trainer.residue_ids = torch.tensor(residue_token_ids(tokenizer), device=trainer.device)
    if args.relation_weight > 0:
        try:
            relations.relation_heads_check(args.relation_heads, teacher_width, "the teacher's hidden size")
            trainer.relations = relations.student_capture(trainer.student, options.relation_layers(args)[1])
        except ValueError as err:
            raise UserError(str(err)) from None


def set_up_outputs(run: Run, resumed: bool) -> None:
    """DDP wrapper, output folder, metrics log, W&B and the validation teacher outputs."""
    args, world, trainer, about = run.args, run.world, run.trainer, run.targets.about
    # The teacher stays as it is on every rank: frozen, never wrapped.
    trainer.model = distributed.wrap_ddp(trainer.student, trainer.device, world)
    if args.compile:  # the training forward only; validation and checkpoints use the student itself
        trainer.model = compiled(trainer.model, trainer.student, args.max_seq_len)
    if world.size > 1:
        distributed.seed_dropout(args.seed, run.position["step"], world)
    barrier(world)  # every rank has read the output folder and checkpoint before rank 0 changes them
    if world.is_main:
        checkpoints.start_output_dir(run.output_dir, args.overwrite, run.position["step"] if resumed else None)
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
        "student_parameters": trainer.student.num_parameters(),
        "processes": world.size,
        "teacher_parameters": about["num_parameters"],
        "teacher_backend": about["backend"],
    }
    use_wandb = args.use_wandb and world.is_main
    wandb_run = start_wandb(args.wandb_project, args.wandb_run_name, args.output_dir, run_config) if use_wandb else None
    run.log = RunLog(run.output_dir / "metrics.jsonl" if world.is_main else None, wandb_run)


def train_loop(run: Run) -> str | None:
    """The optimizer steps, epoch by epoch, until the planned steps, --max_time or a stop signal.
    Returns "non-finite losses" when too many steps in a row had to be skipped, else None; exits
    (after a checkpoint) on SIGINT/SIGTERM."""
    args, position = run.args, run.position
    reads_teacher = teacher_in_loss(args)  # else plain masked LM: the teacher serves evaluation only
    run.window = new_window()
    if position["step"] == 0:  # the starting point of the curves: how far the untrained student is from the teacher
        run.evaluate(0)
    # In a log file the bar is silent: log_training writes a line every --log_every steps instead.
    total, quiet = None if args.max_time else run.total_steps, not run.world.is_main
    bar = progress(
        total=total, initial=position["step"], desc="distill", unit="step", disable=quiet, plain_every_s=None
    )
    run.first_step, run.loop_start = position["step"], time.perf_counter()
    run.trainer.student.train()
    with StopRequest() as stop:
        for epoch in range(position["epoch"], args.num_epochs):
            if run.should_stop():
                break
            position["epoch"] = epoch
            train_epoch(run, epoch, stop, bar, reads_teacher)
            if run.stopped_by or run.should_stop():
                break
            position["epoch"], position["batch"] = epoch + 1, 0
        bar.close()
        if run.stop_signum:
            stop_on_signal(run, run.stop_signum)
    return run.stopped_by


def train_epoch(run: Run, epoch: int, stop: StopRequest, bar, reads_teacher: bool) -> None:
    """The optimizer steps of an epoch from position["batch"] on, until it ends or the run stops.
    Each rank takes its share of each step's batches (distributed.rank_steps)."""
    trainer, epoch_set = run.trainer, run.train_batches(epoch)
    steps = distributed.rank_steps(
        epoch_set, run.position["batch"], run.batches_per_step, run.world, run.args.num_workers
    )
    trainer.optimizer.zero_grad(set_to_none=True)
    for group, batches, count in steps:
        loss_ok = accumulate_gradients(
            trainer, batches, count, run.targets, epoch_set.mask_variant, reads_teacher, run.window
        )
        run.position["batch"] = group.stop
        if not step_agreed(run, loss_ok, stop):
            if run.stopped_by:
                break
            continue
        optimizer_step(trainer)
        after_step(run, epoch, bar, reads_teacher)
        if run.should_stop():
            break


def step_agreed(run: Run, loss_ok: bool, stop: StopRequest) -> bool:
    """Whether to take the step. One all-reduce a step has every rank decide alike: skip the step
    if any rank's loss is not finite, stop if any rank got a signal, and run the budget on one
    clock. Too many skipped steps in a row set run.stopped_by."""
    args, position = run.args, run.position
    bad, stop_signum, position["elapsed_s"] = all_reduce(
        [not loss_ok, stop.signum or 0, time.perf_counter() - run.start_time], run.world, op="max"
    )
    run.stop_signum = int(stop_signum)
    run.out_of_time = bool(args.max_time) and position["elapsed_s"] >= args.max_time * 60
    if not bad:
        run.bad_steps = 0
        return True
    skip_step(run.trainer)  # gradients dropped; under fp16 the loss scale backs off, as on an overflow
    run.bad_steps += 1
    if run.world.is_main:
        warnings.warn(
            f"non-finite loss at step {position['step'] + 1}; step skipped ({run.bad_steps} in a row)", stacklevel=1
        )
    if run.bad_steps >= args.max_bad_steps:
        run.stopped_by = "non-finite losses"
    return False


def after_step(run: Run, epoch: int, bar, reads_teacher: bool) -> None:
    """Count the step taken; log, evaluate and checkpoint when their --*_every says so."""
    args = run.args
    step = run.position["step"] = run.position["step"] + 1
    bar.update(1)
    if step % args.log_every == 0 or step == run.total_steps:
        record = log_training(run, epoch, reads_teacher)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", acc=f"{record['masked_acc']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
        )
        run.window = new_window()
    if step % args.eval_every == 0:
        run.evaluate(step)
    if step % args.save_every == 0:
        run.checkpoint()


def log_training(run: Run, epoch: int, reads_teacher: bool) -> dict:
    """The train record of the window just ended (summed over ranks), written to the log; a plain
    line of it where no progress bar is drawn."""
    dt = max(time.perf_counter() - run.window["t0"], 1e-9)
    sums = dict(zip(WINDOW_SUMS, all_reduce([run.window[k] for k in WINDOW_SUMS], run.world)))
    lr, elapsed = run.trainer.scheduler.get_last_lr()[0], run.position["elapsed_s"]
    record = train_record(sums, dt, run.position["step"], epoch, lr, elapsed, reads_teacher)
    run.log.write(record)
    if run.world.is_main and not is_terminal():
        budget_s = run.args.max_time * 60 if run.args.max_time else None
        left = seconds_left(record["step"], run.total_steps, run.first_step, run.loop_start, budget_s, elapsed)
        print(progress_line(record, run.total_steps, left), flush=True)
    return record


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
        targets.flush()
        raise UserError(
            f"{args.max_bad_steps} non-finite losses in a row at step {step}: stopping. The last good "
            f"checkpoint is kept in {run.output_dir}; try a lower --learning_rate or fp32"
        )
    final_metrics = run.last_eval[1] if run.last_eval and run.last_eval[0] == step else run.evaluate(step)
    final_checkpoint = run.checkpoint()
    run.log.close()
    targets.close()
    teacher_batches = dict(zip(targets.batches, map(int, all_reduce(list(targets.batches.values()), run.world))))
    if not run.world.is_main:
        return None
    output_dir, about, student = run.output_dir, targets.about, run.trainer.student
    plot_training_curves(output_dir / "metrics.jsonl", output_dir / "training_curves.png")
    elapsed = time.perf_counter() - run.start_time
    best = json.loads((output_dir / "best_model" / "config.json").read_text()).get("metadata", {})
    summary = {
        "teacher": about["name"],
        "teacher_backend": about["backend"],
        "device": str(run.trainer.device),
        "processes": run.world.size,
        "batches_per_step": run.batches_per_step,
        "precision": str(run.trainer.autocast_dtype or torch.float32).replace("torch.", ""),
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
    with atomic_open(output_dir / "summary.json", "w") as handle:  # a kill mid-write keeps the earlier one
        handle.write(json.dumps(summary, indent=2, default=str))
    run.log.finish_wandb(final_metrics)
    print(
        f"done: {step} steps in {elapsed / 60:.1f} min; val masked acc {final_metrics['masked_acc']:.3f} "
        f"(teacher {final_metrics['teacher_masked_acc']:.3f}), agreement {final_metrics['agreement']:.3f}; "
        f"best model {output_dir / 'best_model' / 'model.pt'}"
    )
    return summary


def main(argv=None):
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
