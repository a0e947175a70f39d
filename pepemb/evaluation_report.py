"""evaluate.py's report on disk and on screen: report.json, report.md (metrics, fidelity, accuracy
by residue, size and speed), per_residue_accuracy.png and the console summary, all from the
report dict that evaluate_checkpoint returns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pepemb.cli import UserError
from pepemb.files import atomic_open


def write_outputs(report: dict, output_dir: Path) -> None:
    """report.json, report.md and per_residue_accuracy.png in output_dir (created if missing)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output_dir {output_dir}: {err.strerror}") from None
    with atomic_open(output_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with atomic_open(output_dir / "report.md", "w") as f:
        f.write(markdown_report(report))
    plot_per_residue(report, output_dir / "per_residue_accuracy.png")


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metrics_table(report: dict) -> str:
    m = report["metrics"]
    s, t = m["student"], m["teacher"] or {}
    base = m["baseline"]
    return _table(
        ["metric", "student", "teacher"],
        [
            ["masked accuracy", _fmt(s["masked_acc"]), _fmt(t.get("masked_acc"))],
            ["perplexity", _fmt(s["perplexity"], ".2f"), _fmt(t.get("perplexity"), ".2f")],
            ["cross-entropy (nats per masked residue)", _fmt(s["cross_entropy"]), _fmt(t.get("cross_entropy"))],
            ["top-1 agreement with the teacher", _fmt(m["agreement"]), "—"],
            ["KL(teacher ‖ student) at T=1 (nats per masked residue)", _fmt(m["kl_teacher_student"]), "—"],
            [
                f"baseline: always '{base['residue']}' (most frequent residue)",
                _fmt(base["masked_acc"]),
                _fmt(base["masked_acc"]),
            ],
        ],
    )


def speed_table(report: dict) -> str:
    speed, params = report["speed"] or {}, report["parameters"]
    s, t = speed.get("student", {}), speed.get("teacher") or {}
    ratio = speed.get("speedup") or {}
    rows = [
        [
            "parameters",
            f"{params['student']:,}",
            _fmt(params["teacher"], ","),
            _fmt(params["compression"], ".1f") + "x smaller" if params["compression"] else "—",
        ]
    ]
    if s:
        rows += [
            [
                "sequences / s",
                _fmt(s["sequences_per_s"], ".1f"),
                _fmt(t.get("sequences_per_s"), ".1f"),
                _fmt(ratio.get("sequences_per_s"), ".1f") + "x" if ratio else "—",
            ],
            [
                "tokens / s",
                _fmt(s["tokens_per_s"], ",.0f"),
                _fmt(t.get("tokens_per_s"), ",.0f"),
                _fmt(ratio.get("tokens_per_s"), ".1f") + "x" if ratio else "—",
            ],
            ["weights (MB)", _fmt(s["weights_mb"], ".1f"), _fmt(t.get("weights_mb"), ".1f"), ""],
            [
                "peak memory: weights + activation peak (MB)",
                _fmt(s["peak_memory_mb"], ".1f"),
                _fmt(t.get("peak_memory_mb"), ".1f"),
                "",
            ],
        ]
    return _table(["", "student", "teacher", "student vs teacher"], rows)


def markdown_report(report: dict) -> str:
    setup, counts = report["setup"], report["counts"]
    teacher = f"{setup['teacher']} ({setup['teacher_backend']})" if setup["teacher"] else "none"
    per_residue_rows = [
        [residue, f"{r['masked_count']:,}", _fmt(r["frequency"]), _fmt(r["student_acc"]), _fmt(r["teacher_acc"])]
        for residue, r in report["per_residue"].items()
    ]
    parts = [
        f"# Evaluation of {setup['model_path']}",
        f"- data: {setup['data_path']}: {setup['sequences']:,} sequences, {counts['residues']:,} residues "
        f"(longer ones cropped to their first {setup['max_seq_len'] - 2})\n"
        f"- masks: {counts['masked_tokens']:,} masked residues (mask_prob {setup['mask_prob']}, 80/10/10, "
        f"seed {setup['seed']}); metrics are over all of them\n"
        f"- teacher: {teacher}; device: {setup['device']}",
        "## Masked-residue prediction\n\n" + metrics_table(report),
        *fidelity_section(report),
        "## Accuracy by true residue\n\n"
        + _table(["residue", "masked", "frequency in the data", "student acc", "teacher acc"], per_residue_rows),
        "## Size and speed\n\n" + speed_table(report),
    ]
    speed = report["speed"]
    if speed:
        s = speed["student"]
        parts.append(
            f"Timed on the same unmasked batches ({s['batches']} batches, {s['sequences']:,} sequences, "
            f"{s['tokens']:,} tokens) after one warm-up batch, under torch.inference_mode. "
            f"Memory: {s['memory_measure']}."
        )
    return "\n\n".join(parts) + "\n"


def fidelity_table(report: dict) -> str | None:
    """What the student keeps of the teacher beyond top-1: the distribution and the representations."""
    fidelity = report.get("fidelity") or {}
    mutations, reps = fidelity.get("mutation_effects"), fidelity.get("representations")
    rows = []
    if mutations:
        s, b = mutations["student"], mutations["baseline"]
        rows += [
            ["mutation effects: Spearman with the teacher, all pairs", _fmt(s["spearman"]), _fmt(b["spearman"])],
            [
                "mutation effects: mean per protein",
                _fmt(s["spearman_per_protein_mean"]),
                _fmt(b["spearman_per_protein_mean"]),
            ],
            [
                "mutation effects: mean within a position (19 substitutions)",
                _fmt(s["spearman_within_position_mean"]),
                _fmt(b["spearman_within_position_mean"]),
            ],
        ]
    if reps:
        rows += [
            ["linear CKA of the last hidden states (residue tokens)", _fmt(reps["cka"]), "—"],
            [
                f"{reps['knn_k']}-NN overlap of mean embeddings (chance {_fmt(reps['knn_chance'])})",
                _fmt(reps["knn_overlap"]),
                _fmt(reps["knn_chance"]),
            ],
        ]
    space = fidelity.get("teacher_space")
    if space:
        rows += [
            [
                f"teacher space: {reps['knn_k']}-NN overlap of the mapped embeddings",
                _fmt(space["knn_overlap"]),
                _fmt(reps["knn_chance"]),
            ],
            ["teacher space: cosine with the teacher's embedding, both centred", _fmt(space["centred_cosine"]), "0"],
            [
                "teacher space: R² of the teacher's embedding (raw cosine " + _fmt(space["raw_cosine"]) + ")",
                _fmt(space["r2"]),
                "0",
            ],
        ]
    return _table(["measure (against the teacher)", "student", "baseline / chance"], rows) if rows else None


def fidelity_section(report: dict) -> list[str]:
    table = fidelity_table(report)
    if table is None:
        return []
    fidelity = report["fidelity"]
    notes = []
    if "mutation_effects" in fidelity:
        m = fidelity["mutation_effects"]
        notes.append(
            f"Mutation effects: {m['student']['sites']:,} sites ({m['positions_per_protein']} random "
            f"positions in each of {m['proteins']} proteins, seed {m['seed']}), every substitution scored "
            "as log p(mutant) - log p(wild type) with the site masked (ESM-1v's masked marginal), "
            f"{m['student']['pairs']:,} pairs; the baseline scores log f(mutant) - log f(wild type) "
            "from residue frequencies alone."
        )
    if "representations" in fidelity:
        r = fidelity["representations"]
        notes.append(
            f"Representations: linear CKA over {r['cka_tokens']:,} residue tokens; neighbours by cosine "
            f"of mean-pooled last hidden states of {r['knn_proteins']:,} proteins."
        )
    return ["## Fidelity to the teacher beyond masked accuracy\n\n" + table + "\n\n" + " ".join(notes)]


def summary_table(report: dict) -> str:
    fidelity = fidelity_table(report)
    return "\n\n".join(part for part in (metrics_table(report), fidelity, speed_table(report)) if part)


def plot_per_residue(report: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    residues = list(report["per_residue"])
    rows = [report["per_residue"][r] for r in residues]
    has_teacher = report["metrics"]["teacher"] is not None
    x = np.arange(len(residues))
    width = 0.4 if has_teacher else 0.6
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(residues) + 2), 4.8))
    offset = width / 2 if has_teacher else 0.0
    overall = report["metrics"]
    ax.bar(
        x - offset,
        [r["student_acc"] for r in rows],
        width,
        color="tab:blue",
        label=f"student (all residues {overall['student']['masked_acc']:.3f})",
    )
    if has_teacher:
        ax.bar(
            x + offset,
            [r["teacher_acc"] for r in rows],
            width,
            color="tab:orange",
            label=f"teacher (all residues {overall['teacher']['masked_acc']:.3f})",
        )
    base = report["metrics"]["baseline"]
    ax.axhline(
        base["masked_acc"],
        color="grey",
        ls="--",
        lw=1,
        label=f"baseline: always '{base['residue']}' ({base['masked_acc']:.3f})",
    )
    ax.set_xticks(x, [f"{res}\n{r['masked_count']}" for res, r in zip(residues, rows)], fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_xlabel("true residue at the masked position (and its number of masked positions)")
    ax.set_ylabel("masked-residue accuracy")
    ax.set_title(
        f"Accuracy by residue, {report['counts']['masked_tokens']:,} masked positions "
        f"in {report['setup']['sequences']:,} sequences"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
