"""Training checkpoints and the output folder: atomic save, listing, pruning, resume, and
refusing to mix two runs in one folder."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from architecture import CheckpointError, StudentConfig, load_student, save_student
from pepemb import cli
from pepemb.cli import UserError
from pepemb.files import atomic_open

TRAINING_STATE = "training_state.pt"


def read_checkpoint(path: Path, config: StudentConfig) -> tuple[dict, dict]:
    """(student weights, training state) of checkpoint-STEP/, refused unless it holds this run's student."""
    saved = load_student(path, map_location="cpu")
    if saved.model.config != config:
        raise UserError(
            f"{path} holds a different student ({saved.model.summary()}); pass the same sizes "
            "and teacher as the run that wrote it"
        )
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that would run code
        raise CheckpointError(
            f"{path / TRAINING_STATE}: unreadable or unsafe training state "
            f"({str(err).strip().splitlines()[0]}); resume from an earlier checkpoint"
        ) from err
    return saved.model.state_dict(), state


def restore_training_state(path: Path, weights: dict, state: dict, trainer) -> None:
    """Load what read_checkpoint read into a training_step.StudentTrainer: weights, optimizer,
    scheduler, scaler and the RNGs (of the process, or rank 0, that wrote it)."""
    trainer.student.load_state_dict(weights)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    if trainer.hidden_proj is not None:
        if state["hidden_proj"] is None:
            raise UserError(f"{path} was trained without --hidden_weight; resume with the same loss flags")
        trainer.hidden_proj.load_state_dict(state["hidden_proj"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def resume(path: Path, weights: dict, state: dict, trainer, position: dict, batches_per_step: int) -> None:
    """Continue from checkpoint `path`: restore_training_state, then `position` (the checkpoint's)
    takes this run's batches_per_step, with a note when the global batch differs."""
    restore_training_state(path, weights, state, trainer)
    print(f"resumed from {path} at step {position['step']} (epoch {position['epoch']}, batch {position['batch']})")
    if position.get("batches_per_step", batches_per_step) != batches_per_step:
        print(
            f"note: the checkpoint was written with {position['batches_per_step']} batches per optimizer step, "
            f"this run takes {batches_per_step}: the schedule is planned anew for the steps left"
        )
    position["batches_per_step"] = batches_per_step


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-STEP folders, oldest first (a folder being written is named .tmp)."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / TRAINING_STATE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def new_position(batches_per_step: int) -> dict:
    """Where a fresh run starts: what a checkpoint's "position" holds ("batch": the epoch's next
    batch, counted over all ranks; "batches_per_step": the global batch it was counted with)."""
    return {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_val_loss": math.inf,
        "elapsed_s": 0.0,
        "batches_per_step": batches_per_step,
    }


def save_checkpoint(output_dir: Path, trainer, position: dict, metadata: dict, keep_last: int) -> Path:
    """Write checkpoint-STEP/ (a training_step.StudentTrainer's student + everything needed to
    continue exactly) atomically: into a hidden temporary folder first, renamed only once complete."""
    final = output_dir / f"checkpoint-{position['step']}"
    tmp = output_dir / f".checkpoint-{position['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(trainer.student, tmp, metadata)
    state = {
        "position": position,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "hidden_proj": trainer.hidden_proj.state_dict() if trainer.hidden_proj else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with open(tmp / TRAINING_STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again: move the old copy aside, never delete it first
        discard(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last else []:
        discard(old)
    return final


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a checkpoint-STEP/ that looks
    complete: renamed to a hidden name first (one atomic step), then removed."""
    hidden = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> None:
    """Folders a killed run left half-written (.checkpoint-N.tmp) or half-deleted (.checkpoint-N.old)."""
    for leftover in [*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".checkpoint-*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            print(f"--resume auto: no checkpoint in {output_dir}; starting fresh")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE).exists():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {TRAINING_STATE})")
    return path


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> Path:
    """Refuse to mix two runs in one folder unless `resume` (--resume) or `overwrite`
    (--overwrite) says so. Only checks: nothing is created or deleted until the data and teacher
    have loaded (start_output_dir)."""
    output_dir = cli.writable_folder(output_dir, "--output_dir")
    if holds_run(output_dir) and not resume and not overwrite:
        raise UserError(
            f"{output_dir} already holds a training run; pass --resume auto to continue it, "
            "--overwrite to replace it, or another --output_dir"
        )
    return output_dir


def holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and ((output_dir / "metrics.jsonl").exists() or bool(list_checkpoints(output_dir)))


def start_output_dir(output_dir: Path, overwrite: bool, resumed_step: int | None) -> None:
    """Create the folder; with `overwrite` clear the earlier run; on resume (at `resumed_step`)
    drop the metrics records written after the checkpoint, which the resumed run writes again."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if resumed_step is None and overwrite and holds_run(output_dir):
        metrics.unlink(missing_ok=True)
        for old in list_checkpoints(output_dir):
            discard(old)
    elif resumed_step is not None and metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        if kept != lines:
            with atomic_open(metrics, "w") as f:
                f.writelines(kept)
