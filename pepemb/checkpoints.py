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
    continue exactly) so that a kill at any instant leaves a complete copy of every step saved
    before: written whole into .checkpoint-STEP.tmp/ first (training_state.pt last, by rename: its
    presence means complete). A step saved again has its old copy renamed aside to
    .checkpoint-STEP.old/, the new one renamed in, and only then the old one deleted; whichever
    of these a kill interrupts, recover_checkpoints finishes or undoes at the next start."""
    final, tmp, old = _names(output_dir, position["step"])
    shutil.rmtree(tmp, ignore_errors=True)  # a copy a killed run left half written
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
    partial = tmp / f".{TRAINING_STATE}.partial"
    with open(partial, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, tmp / TRAINING_STATE)  # the new copy is complete
    if final.exists():  # the same step saved again: the old copy goes aside, never deleted first
        _remove(old)  # a leftover (checkpoint-STEP/ is whole), out of the way of the rename
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)
    for pruned in list_checkpoints(output_dir)[:-keep_last] if keep_last else []:
        discard(pruned)
    return final


def _names(output_dir: Path, step) -> tuple[Path, Path, Path]:
    """checkpoint-STEP/, the copy being written (.checkpoint-STEP.tmp/) and the one being replaced
    or deleted (.checkpoint-STEP.old/)."""
    return (
        output_dir / f"checkpoint-{step}",
        output_dir / f".checkpoint-{step}.tmp",
        output_dir / f".checkpoint-{step}.old",
    )


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds all three files. training_state.pt is written last (by
    rename) and deleted first (_remove), and each file is written whole by a rename, so a folder
    being written or deleted is never complete."""
    return all((folder / name).is_file() for name in ("model.pt", "config.json", TRAINING_STATE))


def _remove(folder: Path) -> None:
    """Delete a hidden checkpoint folder, training_state.pt first: a kill midway leaves it incomplete."""
    if not folder.is_dir():
        return
    (folder / TRAINING_STATE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted folder that
    looks complete: renamed to the hidden .checkpoint-STEP.old/ first (one atomic step), then
    removed, training_state.pt first. (A kill between the rename and the first deletion leaves the
    whole folder under the hidden name, which recover_checkpoints renames back: a pruned
    checkpoint can come back, never a broken one.)"""
    hidden = folder.with_name(f".{folder.name}.old")
    _remove(hidden)
    os.replace(folder, hidden)
    _remove(hidden)


def _leftovers(output_dir: Path) -> list[Path]:
    return sorted([*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".checkpoint-*.old")])


def recover_checkpoints(output_dir: Path) -> list[Path]:
    """Finish or undo a checkpoint save that a kill interrupted: where checkpoint-STEP/ is
    missing, rename in a complete .checkpoint-STEP.tmp/ (the newer copy), else a complete
    .checkpoint-STEP.old/ (the copy being replaced or pruned). Renames only, nothing is deleted
    (remove_leftovers does that). Every rank may call it at once: a rename another rank made
    first fails here, harmlessly. Returns the checkpoints recovered."""
    recovered = []
    for leftover in _leftovers(output_dir):
        step = leftover.name[len(".checkpoint-") : -len(".tmp")]
        if not step.isdigit():
            continue
        final, tmp, old = _names(output_dir, step)
        for candidate in (tmp, old):
            if final.exists():
                break
            if is_complete(candidate):
                try:
                    os.replace(candidate, final)
                except OSError:  # another rank renamed it (or the other copy) in first
                    continue
                print(f"note: {final} recovered from the interrupted save {candidate.name}")
                recovered.append(final)
    return recovered


def remove_leftovers(output_dir: Path) -> None:
    """After recover_checkpoints, delete what a killed run left half written (.checkpoint-N.tmp/),
    half deleted or replaced (.checkpoint-N.old/)."""
    recover_checkpoints(output_dir)
    for leftover in _leftovers(output_dir):
        _remove(leftover)


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
    (--overwrite) says so. Only checks, after recover_checkpoints has renamed in a checkpoint
    whose save a kill interrupted (so that --resume auto finds it): nothing else is created, and
    nothing deleted, until the data and teacher have loaded (start_output_dir)."""
    output_dir = cli.writable_folder(output_dir, "--output_dir")
    if output_dir.is_dir():
        recover_checkpoints(output_dir)
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
