"""The fidelity benchmark's results: fidelity.json (kept across invocations, so that later ones add
runs), and what is drawn from it: the table of fidelity.md, fidelity.png (validation curves by
minute and by step, test scores at the end of each run) and fidelity_regimes.png (every test
measure against the training-set size and the wall-clock budget)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fidelity_scoring import MUTATION_POSITIONS
from fidelity_variants import VARIANTS, Budget, size_label
from pepemb.cli import UserError
from pepemb.files import atomic_open
from student_runs import REPO, TEACHER


def load_results(path: Path, setup: dict) -> dict:
    """Earlier results in this folder, if made with the same setup; else a new record."""
    if not path.is_file():
        return {"setup": setup, "caches": {}, "runs": []}
    results = json.loads(path.read_text())
    earlier = _settings(results["setup"])
    differ = [k for k, value in _settings(setup).items() if earlier.get(k) != value]
    if differ:
        raise UserError(
            f"{path} holds runs made with other settings ({', '.join(differ)}); pass another --output_dir or delete it"
        )
    return results


def _settings(setup: dict) -> dict:
    """What runs must share to join one fidelity.json: the setup but its start, machine and the
    wording of its data note."""
    return {
        key: {**value, "note": None} if key == "data" else value
        for key, value in setup.items()
        if key not in ("started", "machine")
    }


def save_results(results: dict, output_dir: Path) -> None:
    """fidelity.json and everything drawn from it: fidelity.md, fidelity.png, fidelity_regimes.png."""
    with atomic_open(output_dir / "fidelity.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_open(output_dir / "fidelity.md", "w") as f:
        f.write(results_table(results) + "\n")
    plot_results(results, output_dir / "fidelity.png")
    plot_regimes(results, output_dir / "fidelity_regimes.png")


MEASURES = (
    ("masked_acc", "test acc"),
    ("mutation_spearman", "mutation ρ"),
    ("mutation_spearman_within_position", "ρ within position"),
    ("cka", "CKA"),
    ("knn_overlap", "10-NN overlap"),
)


def _value(record: dict, key: str, spec: str = ".3f") -> str:
    value = record.get("test", {}).get(key)
    return "—" if value is None else format(value, spec)


def _sort_key(r: dict) -> tuple:
    return (
        r.get("train_size") or 10**9,
        Budget.of(r).sort_key(),
        list(VARIANTS).index(r["variant"]),
        r.get("repeat", 1),
    )


def data_line(split: dict) -> str:
    """Where the chains came from and how they were split (setup["data"]), as the table says it."""
    source = Path(split["source"])
    shown = source.relative_to(REPO) if source.is_relative_to(REPO) else source
    return (
        f"{split['note']} ({split['train']:,} train / {split['val']:,} val / {split['test']:,} test chains of {shown})"
    )


def results_table(results: dict) -> str:
    """fidelity.md: the setup, a row a run, and the spread of repeated runs."""
    setup = results["setup"]
    teacher = next((r["test"] for r in results["runs"] if "test" in r), None)
    base = setup.get("baseline_mutations")
    lines = [
        f"Data: {data_line(setup['data'])}. Student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers, {setup['student']['num_heads']} heads; "
        f"batch {setup['batch_size']}, lr {setup['learning_rate']:g}, warmup {setup['warmup_steps']} steps. "
        f"Teacher {TEACHER} ({setup.get('teacher_backend')})"
        + (
            f": test masked acc {teacher['teacher_masked_acc']:.3f}, perplexity {teacher['teacher_perplexity']:.2f}"
            if teacher
            else ""
        )
        + "."
        + (
            f" Mutation effects: {MUTATION_POSITIONS} sites in each of {setup['mutation_proteins']} test chains, "
            f"19 substitutions each; the residue-frequency baseline scores ρ {base['spearman']:.3f} "
            f"(within position {base['spearman_within_position_mean'] or 0:.3f})."
            if base
            else ""
        ),
        "",
        "| variant | training chains | budget | steps | mask variants | training (min) | process CPU (min) "
        "| tokens/s | teacher batches live / cached | cache fill outside budget (min) | test acc | agreement "
        "| KL | perplexity | mutation ρ | ρ within position | CKA | 10-NN overlap | load avg before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results["runs"], key=_sort_key):
        budget = Budget.of(r).label + (f" (repeat {r['repeat']})" if r.get("repeat", 1) > 1 else "")
        size = size_label(r.get("train_size"))
        if "error" in r:
            lines.append(f"| {r['variant']} | {size} | {budget} | failed: {r['error'].splitlines()[0]} |")
            continue
        t, live = r["test"], r["teacher_batches"]
        fill = f"{r['cache_fill_s'] / 60:.1f}" if r["cache_fill_s"] else "—"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        cpu = f"{r['process_cpu_s'] / 60:.1f}" if r.get("process_cpu_s") is not None else "—"
        variant = VARIANTS.get(r["variant"])
        replays_masks = variant is not None and variant.cache is not None and variant.teacher_in_loss
        masks = r.get("mask_variants", "—") if replays_masks else "fresh"  # masked LM draws new masks every epoch
        if r.get("threads"):  # runs that shared the machine: their times say little
            rate += f" ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, shared)"
        lines.append(
            f"| {r['variant']} | {size} | {budget} | {r['steps']} | {masks} "
            f"| {r['training_s'] / 60:.1f} | {cpu} | {rate} | {live['live']} / {live['cached']} | {fill} "
            f"| {t['masked_acc']:.3f} | {t['agreement']:.3f} | {t['kl']:.3f} | {t['perplexity']:.2f} "
            f"| {_value(r, 'mutation_spearman')} | {_value(r, 'mutation_spearman_within_position')} "
            f"| {_value(r, 'cka')} | {_value(r, 'knn_overlap')} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    groups = regime_groups(results)
    if any(len(runs) > 1 for runs in groups.values()):
        lines += [
            "",
            "Repeated runs: mean (min-max) over the repeats",
            "",
            "| variant | training chains | budget | runs | " + " | ".join(label for _, label in MEASURES) + " |",
            "|---|---:|---|---:|" + "---:|" * len(MEASURES),
        ]
        for (variant, size, budget), runs in sorted(groups.items(), key=lambda g: _sort_key(g[1][0])):
            if len(runs) > 1:
                lines.append(
                    f"| {variant} | {size_label(size)} | {budget.label} | {len(runs)} | "
                    + " | ".join(spread_text([r["test"].get(k) for r in runs]) for k, _ in MEASURES)
                    + " |"
                )
    return "\n".join(lines)


def regime_groups(results: dict) -> dict:
    """The scored runs grouped by (variant, training-set size, budget): the repeats of one setting."""
    groups = {}
    for r in results["runs"]:
        if "error" not in r:
            groups.setdefault((r["variant"], r.get("train_size"), Budget.of(r)), []).append(r)
    return groups


def spread_text(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def plot_results(results: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r]
    if not runs:
        return
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(VARIANTS)}
    budgets = sorted({Budget.of(r) for r in runs}, key=Budget.sort_key)
    styles = dict(zip(budgets, ["-", "--", ":", "-."] * len(budgets)))
    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    panels = (
        (axes[0], "masked_acc", "masked accuracy", "minutes"),
        (axes[1], "agreement", "top-1 agreement", "minutes"),
        (axes[2], "masked_acc", "masked accuracy", "step"),
    )
    for ax, key, title, x in panels:
        for r in runs:
            budget = Budget.of(r)
            if x == "minutes" and budget.minutes is None:
                continue  # step-budget runs may have shared the machine: their minutes mean little
            xs = [p["elapsed_s"] / 60 if x == "minutes" else p["step"] for p in r["curve"]]
            label = (
                f"{r['variant']} {budget.label}"
                + (f", {r['train_size']:,} chains" if r.get("train_size") else "")
                + (f" #{r['repeat']}" if r.get("repeat", 1) > 1 else "")
                + (f" ({r['steps']} steps)" if budget.minutes else "")
            )
            ax.plot(
                xs,
                [p[key] for p in r["curve"]],
                styles[budget],
                color=colors[r["variant"]],
                marker="o",
                ms=3,
                label=label,
            )
            ax.plot(xs[-1], r["test"][key], "*", color=colors[r["variant"]], ms=12, mec="black")
            if r["cache_fill_s"] and x == "minutes":  # the curve had the cache fill been paid inside the budget
                ax.plot(
                    [m + r["cache_fill_s"] / 60 for m in xs],
                    [p[key] for p in r["curve"]],
                    ":",
                    color=colors[r["variant"]],
                    alpha=0.5,
                    label=f"{r['variant']} {budget.label}, shifted by its cache fill",
                )
        if key == "masked_acc":
            ax.axhline(runs[0]["test"]["teacher_masked_acc"], ls="--", color="grey", label="teacher (test)")
        # the early climb is alike for all: show where the runs end, which is where they differ
        ax.set_ylim(bottom=max(0.0, min(r["test"][key] for r in runs) - 0.25))
        # Steps are what a shared machine cannot distort: wall-clock budgets buy more or fewer of them.
        ax.set(
            xlabel="training wall-clock minutes" if x == "minutes" else "optimizer step",
            ylabel=title,
            title=f"Validation {title} by {x} (lines), test at the end (stars)",
        )
        ax.grid(alpha=0.3)
    legend = {}  # one legend for the three panels, below them, where it hides no curve
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    setup = results["setup"]
    fig.suptitle(
        f"{TEACHER} -> student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers; {setup['data']['note']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04 * (1 + len(legend) // 4), 1, 1))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


MIN_Y_SPAN = 0.1  # of a measure's axis in the regime plot: differences under ~0.02 are run-to-run noise


def plot_regimes(results: dict, png_path: Path) -> None:
    """Every measure against the training-set size (one line per variant and budget) and against
    the wall-clock budget (one line per variant and size): where a teacher pays, and where not."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = regime_groups(results)
    n_train = results["setup"]["data"]["train"]
    by_size, by_minutes = {}, {}  # series -> {x: runs}
    for (variant, size, budget), runs in groups.items():
        by_size.setdefault((variant, budget.label), {})[size or n_train] = runs
        if budget.minutes is not None:
            by_minutes.setdefault((variant, size_label(size)), {})[budget.minutes] = runs
    rows = [
        (name, series)
        for name, series in (("training chains", by_size), ("wall-clock budget (min)", by_minutes))
        if any(len(points) > 1 for points in series.values())
    ]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(MEASURES), figsize=(4.2 * len(MEASURES), 3.8 * len(rows)), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(VARIANTS)}
    base = results["setup"].get("baseline_mutations") or {}
    for (xlabel, series), ax_row in zip(rows, axes):
        for ax, (key, label) in zip(ax_row, MEASURES):
            for (variant, which), points in sorted(series.items()):
                if len(points) < 2:
                    continue
                xs = sorted(points)
                values = [[r["test"].get(key) for r in points[x] if r["test"].get(key) is not None] for x in xs]
                means = [np.mean(v) if v else np.nan for v in values]
                low = [m - min(v) if v else 0 for m, v in zip(means, values)]
                high = [max(v) - m if v else 0 for m, v in zip(means, values)]
                ax.errorbar(
                    xs,
                    means,
                    yerr=[low, high],
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=colors[variant],
                    ls="-" if variant.startswith("kd") else "--",
                    label=f"{variant}, {which}",
                )
            if key == "mutation_spearman" and base.get("spearman") is not None:
                ax.axhline(base["spearman"], color="grey", ls=":", label="residue-frequency baseline")
            if xlabel == "training chains":
                sizes = sorted({x for points in series.values() for x in points})
                ax.set_xscale("log")
                ax.set_xticks(sizes, [f"{x:,}" for x in sizes])  # plain numbers, not 2x10^3 (mathtext)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            low_y, high_y = ax.get_ylim()
            if high_y - low_y < MIN_Y_SPAN:  # a 0.005 wiggle should not fill the panel
                middle = (low_y + high_y) / 2
                ax.set_ylim(middle - MIN_Y_SPAN / 2, middle + MIN_Y_SPAN / 2)
            ax.set(xlabel=xlabel, title=label)
            ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    setup = results["setup"]
    fig.suptitle(
        f"What distillation buys: {TEACHER} -> student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers; test split of {setup['data']['note']} "
        "(mean of repeats, bars: min-max)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05 * (1 + len(legend) // 4), 1, 1))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
