"""What a training run reports: metrics.jsonl records, Weights & Biases, the training-curve plot."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from pepemb.losses import TERMS
from pepemb.progress import format_seconds


def start_wandb(project: str, run_name: str | None, output_dir: str, config: dict):
    """A W&B run of `project` (named `run_name`, files under `output_dir`), or None (with one
    warning) when wandb is missing or not logged in."""
    try:
        import wandb
    except ImportError:
        warnings.warn("--use_wandb: wandb is not installed; continuing without W&B", stacklevel=2)
        return None
    # The mode as wandb.init will see it (environment and settings files); login() without a
    # prompt or verification only looks for stored credentials, so this needs no network.
    offline = wandb.setup().settings.mode in ("offline", "dryrun", "disabled")
    if not offline and not wandb.login(prompt=False, verify=False):
        warnings.warn(
            "--use_wandb: not logged in to W&B (run `python setup_wandb.py`, or set "
            "WANDB_MODE=offline); continuing without W&B",
            stacklevel=2,
        )
        return None
    try:
        return wandb.init(project=project, name=run_name, config=config, dir=str(output_dir))
    except Exception as err:  # network, auth: training must not die for monitoring
        warnings.warn(f"--use_wandb: could not start a W&B run ({err}); continuing without W&B", stacklevel=2)
        return None


def train_record(
    sums: dict, seconds: float, step: int, epoch: int, lr: float, elapsed_s: float, reads_teacher: bool
) -> dict:
    """The metrics.jsonl train record of a log window: its sums (losses.WINDOW_SUMS, over every
    rank) as means per masked position and rates over `seconds`; agreement None without a teacher."""
    m = max(sums["masked"], 1)
    return {
        "split": "train",
        "step": step,
        "epoch": epoch,
        **{k: sums[k] / m for k in TERMS},
        "masked_acc": sums["correct"] / m,
        "agreement": sums["agree"] / m if reads_teacher else None,
        "lr": lr,
        "tokens_per_s": sums["tokens"] / seconds,
        "sequences_per_s": sums["seqs"] / seconds,
        "elapsed_s": elapsed_s,
    }


def seconds_left(
    step: int, total_steps: int, first_step: int, loop_start: float, budget_s: float | None, elapsed_s: float
) -> float:
    """The time-left estimate: what the wall-clock budget leaves, or the steps left at the pace
    this process has kept since it reached first_step at perf_counter() time loop_start."""
    if budget_s:
        return max(budget_s - elapsed_s, 0.0)
    return (total_steps - step) * (time.perf_counter() - loop_start) / max(step - first_step, 1)


def progress_line(record: dict, total_steps: int, left_s: float) -> str:
    """One plain line of a train record, for logs (nohup, SLURM, CI) where no bar is drawn."""
    terms = " ".join(f"{k} {record[k]:.3f}" for k in ("kl", "ce", "cos", "emb") if record.get(k))
    agreement = f" | agree {record['agreement']:.3f}" if record["agreement"] is not None else ""
    return (
        f"step {record['step']:,}/{total_steps:,} | epoch {record['epoch']} | loss {record['loss']:.3f} ({terms}) "
        f"| acc {record['masked_acc']:.3f}{agreement} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s "
        f"| {format_seconds(record['elapsed_s'])} elapsed, ~{format_seconds(left_s)} left"
    )


def plot_training_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (
        ("loss", "total"),
        ("kl", "KL (x T²)"),
        ("ce", "masked CE"),
        ("cos", "hidden cosine"),
        ("emb", "teacher-space embedding (1 - R²)"),
    ):
        if train and any(r.get(key) for r in train):
            ax_loss.plot([r["step"] for r in train], [r.get(key, 0) for r in train], label=f"train {label}", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val total", color="black")
        ax_acc.plot([r["step"] for r in val], [r["masked_acc"] for r in val], "o-", label="student masked acc")
        ax_acc.plot([r["step"] for r in val], [r["agreement"] for r in val], "s-", label="agreement with teacher")
        ax_acc.axhline(
            val[-1]["teacher_masked_acc"],
            ls="--",
            color="grey",
            label=f"teacher masked acc ({val[-1]['teacher_masked_acc']:.3f})",
        )
        ax_acc.set_ylim(0, 1)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Training and validation loss")
    ax_acc.set(xlabel="optimizer step", ylabel="fraction of masked residues", title="Validation (fixed masks)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


class RunLog:
    """metrics.jsonl, one JSON record a line, mirrored to W&B when a run is given. With no path
    (ranks other than 0) records go nowhere."""

    def __init__(self, metrics_path: Path | None, wandb_run=None):
        self.file = open(metrics_path if metrics_path is not None else os.devnull, "a")
        self.wandb_run = wandb_run

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(
                {f"{record['split']}/{k}": v for k, v in record.items() if k != "split"}, step=record["step"]
            )

    def close(self) -> None:
        self.file.close()

    def finish_wandb(self, final_metrics: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({"final_val/" + k: v for k, v in final_metrics.items()})
            self.wandb_run.finish()
