"""Which student should I distil? The size x training compute x recipe frontier, from the
results of bench/fidelity.py.

    python bench/frontier.py outputs/length_curve/fidelity.json [more fidelity.json ...] \
        --output_dir outputs/frontier

One row per checkpoint scored on the test split: every run's final checkpoint and, where
`bench/fidelity.py --score_steps` kept them, its checkpoints along the way (points of that run's
schedule: the learning rate there had not decayed yet). Columns: student (d_model x layers),
parameters, recipe (the fidelity variant), steps, training CPU-minutes, inference residues/s and
the fidelity measures: masked accuracy and its ratio to the teacher's, agreement,
mutation-effect Spearman with the teacher (all pairs and within a position), CKA, 10-NN overlap.

Training CPU-minutes: a run's CPU time where it ran alone (process_cpu_s), else its threads x
its wall minutes (a one-thread run beside another uses at most its wall time), up to the
checkpoint's step by the run's own clock. Teacher cache fills are not in it; frontier.md lists
them. Inference residues/s: each student size is measured in this run on the same batches of
unmasked test chains (32 a batch, fp32, on this machine's default threads) by
pepemb.speed.measure_speed, so the speeds of one table compare.

Writes frontier.json, frontier.md and frontier.png (mutation Spearman and masked-accuracy ratio
against inference speed, the Pareto front marked, and against training CPU-minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from architecture import load_student  # noqa: E402
from pepemb import cli, data  # noqa: E402
from pepemb.speed import measure_speed  # noqa: E402

SPEED_BATCHES, BATCH = 8, 32
MEASURES = (  # the test scores a row copies
    "masked_acc",
    "agreement",
    "mutation_spearman",
    "mutation_spearman_within_position",
    "cka",
    "knn_overlap",
    "teacher_masked_acc",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="fidelity.json files of bench/fidelity.py")
    p.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "frontier")
    return p


def cpu_minutes(run: dict, step: int) -> float:
    """Training CPU-minutes of a run up to `step` (module docstring)."""
    curve = run["curve"]
    seconds = float(np.interp(step, [c["step"] for c in curve], [c["elapsed_s"] for c in curve]))
    if run.get("process_cpu_s"):
        return run["process_cpu_s"] * seconds / run["training_s"] / 60
    return (run.get("threads") or 1) * seconds / 60


def rows_of(results: dict, source: Path) -> list[dict]:
    """One row per scored checkpoint of every run without an error."""
    student = results["setup"]["student"]
    rows = []
    for run in results["runs"]:
        if "error" in run or "test" not in run:
            continue
        points = run.get("along") or [{"step": run["steps"], **run["test"]}]
        for point in points:
            rows.append(
                {
                    "source": str(source),
                    "student": f"{student['d_model']} x {student['num_layers']}",
                    "d_model": student["d_model"],
                    "num_layers": student["num_layers"],
                    "recipe": run["variant"],
                    "run_steps": run["steps"],
                    "step": point["step"],
                    "cpu_min": cpu_minutes(run, point["step"]),
                    "checkpoint": run["checkpoint"],
                    "masked_acc_ratio": point["masked_acc"] / point["teacher_masked_acc"],
                    **{k: point[k] for k in MEASURES},
                }
            )
    return rows


def inference_speed(checkpoint: str, test_fasta: Path) -> dict:
    """Residues/s of a student's forward pass on unmasked test chains, and its parameters."""
    student, tokenizer, _ = load_student(checkpoint)
    sequences = [p.sequence for p in data.read_fasta(test_fasta)][: SPEED_BATCHES * BATCH]
    batches = [data.unmasked_batch(sequences[i : i + BATCH], tokenizer, 160) for i in range(0, len(sequences), BATCH)]
    speed = measure_speed(student, student, batches, torch.device("cpu"))
    residues = sum(int(b["attention_mask"].sum()) - 2 * len(b["input_ids"]) for b in batches[1:])
    return {"residues_per_s": residues / speed["seconds"], "parameters": student.num_parameters()}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better)."""
    return [i for i, (x, y) in enumerate(points) if not any(a >= x and b >= y and (a, b) != (x, y) for a, b in points)]


def table(rows: list[dict], fills: list[str]) -> str:
    head = (
        "| student | parameters | recipe | steps (of the run's) | training CPU-min | inference residues/s | "
        "masked acc (ratio to teacher) | agreement | mutation ρ | within position | CKA | 10-NN overlap |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['student']} | {r['parameters'] / 1e6:.1f}M | {r['recipe']} | {r['step']:,} ({r['run_steps']:,}) | "
        f"{r['cpu_min']:.0f} | {r['residues_per_s']:,.0f} | {r['masked_acc']:.3f} ({r['masked_acc_ratio']:.3f}) | "
        f"{r['agreement']:.3f} | {r['mutation_spearman']:.3f} | {r['mutation_spearman_within_position']:.3f} | "
        f"{r['cka']:.3f} | {r['knn_overlap']:.3f} |"
        for r in rows
    ]
    return "\n".join([head, *lines, "", "Teacher cache fills (not in the CPU-minutes): " + "; ".join(fills)])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    recipes = sorted({r["recipe"] for r in rows})
    colours = dict(zip(recipes, plt.cm.tab10.colors))
    for col, (key, label) in enumerate(
        [
            ("mutation_spearman", "mutation-effect Spearman with the teacher"),
            ("masked_acc_ratio", "masked accuracy / teacher's"),
        ]
    ):
        finals = [r for r in rows if r["step"] == r["run_steps"]]
        ax = axes[0, col]
        for recipe in recipes:
            mine = [r for r in finals if r["recipe"] == recipe]
            ax.scatter([r["residues_per_s"] for r in mine], [r[key] for r in mine], color=colours[recipe], label=recipe)
        front = [finals[i] for i in pareto([(r["residues_per_s"], r[key]) for r in finals])]
        front.sort(key=lambda r: r["residues_per_s"])
        ax.plot(
            [r["residues_per_s"] for r in front],
            [r[key] for r in front],
            "k--o",
            mfc="none",
            ms=12,
            lw=1,
            label="Pareto front",
        )
        ax.set(
            xlabel="inference residues/s (this machine)",
            ylabel=label,
            xscale="log",
            title=f"{label}: final checkpoints",
        )
        ax.legend(fontsize=8)
        ax = axes[1, col]
        for (_, recipe, student, steps), group in _runs(rows).items():
            group.sort(key=lambda r: r["step"])
            ax.plot(
                [r["cpu_min"] for r in group],
                [r[key] for r in group],
                "o-",
                color=colours[recipe],
                label=f"{recipe}, {student}, {steps:,} steps",
            )
        ax.set(xlabel="training CPU-minutes (cache fill not counted)", ylabel=label, title=f"{label} along training")
        ax.legend(fontsize=7)
        for a in axes[:, col]:
            a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _runs(rows: list[dict]) -> dict:
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["source"], r["recipe"], r["student"], r["run_steps"]), []).append(r)
    return runs


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows, fills, speeds = [], [], {}
    for path in args.results:
        if not path.is_file():
            raise cli.UserError(f"{path}: no such fidelity.json (bench/fidelity.py writes one)")
        results = json.loads(path.read_text())
        new = rows_of(results, path)
        for r in new:
            if r["student"] not in speeds:  # one measurement per size, all in this run
                print(f"inference speed of the {r['student']} student...", flush=True)
                speeds[r["student"]] = inference_speed(r["checkpoint"], path.parent / "data" / "test.fasta")
            r.update(speeds[r["student"]])
        rows += new
        fills += [
            f"{k}: {c['fill_s'] / 60:.1f} min ({c['fill_cpu_s'] / 60:.1f} CPU-min)"
            for k, c in results["caches"].items()
        ]
    if not rows:
        raise cli.UserError("no scored runs in the results given")
    rows.sort(key=lambda r: (r["d_model"], r["recipe"], r["run_steps"], r["step"]))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "frontier.json").write_text(json.dumps({"rows": rows, "cache_fills": fills}, indent=2) + "\n")
    (args.output_dir / "frontier.md").write_text(table(rows, fills) + "\n")
    plot(rows, args.output_dir / "frontier.png")
    print(table(rows, fills))
    print(f"\nwritten: {args.output_dir}/frontier.json, frontier.md, frontier.png")


if __name__ == "__main__":
    cli.run(main)
