"""Evaluate a distilled student, and its teacher, on held-out proteins.

    python evaluate.py --model_path checkpoints/best_model --data_path data/antibody_split \
        --output_dir outputs/evaluation [--teacher_model antiberty | none]

Masked-LM quality on fixed masks (each sequence's own, fixed by --seed whatever the batching;
on distill.py's validation split with its seed, its validation masks): masked accuracy,
perplexity, top-1 agreement with the teacher, KL(teacher || student) at T = 1, accuracy per
true residue and a most-frequent-residue baseline. Then throughput and peak memory of both
models on the same unmasked batches. Writes report.json, report.md and per_residue_accuracy.png
to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from architecture import load_student
from pepemb import cli, data
from pepemb.cli import UserError
from pepemb.data import MaskedBatches, Masking
from pepemb.devices import resolve_device
from pepemb.files import atomic_open
from pepemb.heldout import (
    EMBEDDING_PROTEINS,
    MUTATION_POSITIONS,
    MUTATION_PROTEINS,
    MutationProbe,
    build_report,
    last_hidden_states,
    masked_statistics,
    representation_measures,
    residue_counts,
    sample_proteins,
    teacher_space_measures,
)
from pepemb.options import add_device_arguments

DEFAULT_MAX_SEQ_LEN = 512
NO_TEACHER = "none"
MB = 2**20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model_path", required=True, help="student checkpoint: its folder or model.pt")
    p.add_argument(
        "--data_path",
        required=True,
        help="FASTA file (evaluated whole), or a split folder (download_sample_data.py) whose test.fasta is used",
    )
    p.add_argument("--output_dir", default="outputs/evaluation", help="report.json, report.md and the plot go here")
    p.add_argument(
        "--teacher_model",
        default=None,
        help="HF masked LM (Hub id, folder, 'antiberty'); default: the checkpoint's teacher; 'none' skips the teacher",
    )
    p.add_argument("--use_8bit", action="store_true", help="8-bit teacher (bitsandbytes on CUDA, torch int8 on CPU)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow a Hub teacher to run its own code")
    p.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help=f"tokens per sequence incl. start/end, longer ones keep their N-terminal window; "
        f"None: the checkpoint's, else {DEFAULT_MAX_SEQ_LEN}",
    )
    p.add_argument("--batch_size", type=int, default=32, help="sequences per batch (ignored with --max_tokens)")
    p.add_argument("--max_tokens", type=int, default=None, help="token budget per batch instead of --batch_size")
    p.add_argument("--mask_prob", type=float, default=0.15, help="fraction of residues masked (80/10/10)")
    p.add_argument("--seed", type=int, default=42, help="fixes the masks (distill.py's validation masks with its seed)")
    p.add_argument("--max_sequences", type=int, default=None, help="evaluate only the first N sequences")
    p.add_argument(
        "--speed_batches",
        type=int,
        default=20,
        help="batches timed per model, spread over all lengths (0 skips timing)",
    )
    g = p.add_argument_group("fidelity beyond masked accuracy (needs the teacher)")
    g.add_argument(
        "--mutation_proteins",
        type=int,
        default=MUTATION_PROTEINS,
        help="proteins drawn (by --seed) for zero-shot mutation effects; 0 skips them",
    )
    g.add_argument(
        "--mutation_positions",
        type=int,
        default=MUTATION_POSITIONS,
        help="random sites per protein, each scored for its 19 substitutions by masked marginals",
    )
    g.add_argument(
        "--embedding_proteins",
        type=int,
        default=EMBEDDING_PROTEINS,
        help="proteins drawn (by --seed) for CKA and 10-NN overlap of the last hidden states; 0 skips them",
    )
    add_device_arguments(p, training=False, precision=False)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    report = evaluate_checkpoint(**vars(args))
    print(summary_table(report))
    print(f"report: {Path(args.output_dir) / 'report.md'}")


def evaluate_checkpoint(
    model_path,
    data_path,
    output_dir,
    teacher_model=None,
    *,
    max_seq_len=None,
    batch_size=32,
    max_tokens=None,
    mask_prob=0.15,
    seed=42,
    max_sequences=None,
    speed_batches=20,
    device="auto",
    use_8bit=False,
    trust_remote_code=False,
    mutation_proteins=MUTATION_PROTEINS,
    mutation_positions=MUTATION_POSITIONS,
    embedding_proteins=EMBEDDING_PROTEINS,
) -> dict:
    """Evaluate the checkpoint (and teacher) and write report.json, report.md and
    per_residue_accuracy.png into output_dir; returns the report (report.json's content)."""
    check_options(batch_size, max_tokens, mask_prob, max_sequences, speed_batches, max_seq_len)
    for name, value in (
        ("mutation_proteins", mutation_proteins),
        ("mutation_positions", mutation_positions),
        ("embedding_proteins", embedding_proteins),
    ):
        if value < 0:
            raise UserError(f"--{name} must not be negative (got {value})")
    cli.writable_folder(output_dir, "--output_dir")  # before the work, not after it
    device = resolve_device(device)
    student, tokenizer, metadata = load_student(model_path, map_location=device)
    fasta, sequences = read_sequences(data_path, max_sequences)
    teacher = load_matching_teacher(teacher_model, metadata, tokenizer, device, use_8bit, trust_remote_code)
    max_seq_len = max_seq_len or metadata.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN
    if teacher is not None and max_seq_len > teacher.max_positions:
        print(
            f"note: the teacher takes at most {teacher.max_positions} positions; "
            f"--max_seq_len {max_seq_len} lowered to {teacher.max_positions}"
        )
        max_seq_len = teacher.max_positions
    if max_tokens is not None and max_tokens < max_seq_len:
        raise UserError(f"--max_tokens {max_tokens} is smaller than --max_seq_len {max_seq_len}")

    batching = Masking(
        max_seq_len=max_seq_len, mask_prob=mask_prob, seed=seed, max_tokens=max_tokens, batch_size=batch_size
    )
    masked_batches = MaskedBatches(sequences, tokenizer, batching, epoch=0, train=False)
    unmasked = masked_batches.unmasked()

    speed = None
    if speed_batches:
        timed = data.evenly_spaced(unmasked, speed_batches)
        speed = {"student": measure_speed(student, student, timed, device)}
        if teacher is not None:
            speed["teacher"] = measure_speed(
                lambda ids, mask: teacher.model(input_ids=ids, attention_mask=mask), teacher.model, timed, device
            )
            speed["speedup"] = {
                k: speed["student"][k] / speed["teacher"][k] for k in ("sequences_per_s", "tokens_per_s")
            }

    stats = masked_statistics(student, teacher, masked_batches, device)
    fidelity = None
    if teacher is not None and (mutation_proteins and mutation_positions or embedding_proteins):
        fidelity = fidelity_measures(
            student,
            teacher,
            sequences,
            tokenizer,
            batching,
            device,
            mutation_proteins=mutation_proteins,
            mutation_positions=mutation_positions,
            embedding_proteins=embedding_proteins,
        )
    student_params = student.num_parameters()
    report = {
        "setup": {
            "model_path": str(model_path),
            "data_path": str(fasta),
            "teacher": teacher.name if teacher else None,
            "teacher_backend": teacher.backend if teacher else None,
            "device": str(device),
            "max_seq_len": max_seq_len,
            "mask_prob": mask_prob,
            "seed": seed,
            "batch_size": batch_size,
            "max_tokens": max_tokens,
            "sequences": len(sequences),
            "batches": len(masked_batches),
        },
        "parameters": {
            "student": student_params,
            "teacher": teacher.num_parameters if teacher else None,
            "compression": teacher.num_parameters / student_params if teacher else None,
        },
        **build_report(stats, residue_counts(unmasked, tokenizer), tokenizer, speed),
        "fidelity": fidelity,
    }
    write_outputs(report, Path(output_dir))
    return report


def fidelity_measures(
    student,
    teacher,
    sequences,
    tokenizer,
    batching,
    device,
    *,
    mutation_proteins,
    mutation_positions,
    embedding_proteins,
) -> dict:
    """Mutation-effect agreement, CKA and 10-NN overlap with the teacher (evaluation.py), timed.
    `batching` is evaluate's masking namespace: its max_seq_len, seed and batch sizes apply."""
    max_seq_len, seed = batching.max_seq_len, batching.seed
    start = time.perf_counter()
    fidelity = {}
    if mutation_proteins and mutation_positions:
        probe = MutationProbe(
            sequences,
            tokenizer,
            proteins=mutation_proteins,
            positions=mutation_positions,
            seed=seed,
            max_seq_len=max_seq_len,
        )
        fidelity["mutation_effects"] = probe.report(probe.scores(student, device), probe.scores(teacher, device))
    if embedding_proteins:
        chosen = [sequences[i] for i in sample_proteins(len(sequences), embedding_proteins, seed)]
        batches = MaskedBatches(chosen, tokenizer, batching, epoch=0, train=False).unmasked()
        student_states, teacher_states = (
            last_hidden_states(student, batches, device),
            last_hidden_states(teacher, batches, device),
        )
        fidelity["representations"] = representation_measures(student_states, teacher_states, seed=seed)
        if student.teacher_map is not None:  # distilled with --embedding_weight: its teacher-space embeddings
            with torch.no_grad():
                mapped = student.teacher_map(student_states["pooled"].to(device)).cpu()
            fidelity["teacher_space"] = teacher_space_measures(mapped, teacher_states["pooled"])
    fidelity["seconds"] = time.perf_counter() - start
    return fidelity


def check_options(batch_size, max_tokens, mask_prob, max_sequences, speed_batches, max_seq_len) -> None:
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("max_sequences", max_sequences)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be positive (got {value})")
    if speed_batches < 0:
        raise UserError(f"--speed_batches must not be negative (got {speed_batches})")
    if not 0 < mask_prob < 1:
        raise UserError(f"--mask_prob must be between 0 and 1 (got {mask_prob})")
    if max_seq_len is not None and max_seq_len < 3:
        raise UserError("--max_seq_len must leave room for start, end and one residue (>= 3)")


def read_sequences(data_path, max_sequences: int | None) -> tuple[Path, list[str]]:
    """(the FASTA read, its sequences): a split folder's test.fasta, or the file itself."""
    path = Path(data_path)
    if path.is_dir():
        path = path / "test.fasta"
        if not path.is_file():
            raise UserError(
                f"{data_path}: a data folder needs test.fasta (see download_sample_data.py); or pass a FASTA file"
            )
    sequences = [p.sequence for p in data.read_fasta(path)][:max_sequences]
    if not sequences:
        raise UserError(f"{path}: no sequences to evaluate")
    return path, sequences


def load_matching_teacher(name, metadata, tokenizer, device, use_8bit, trust_remote_code):
    """The teacher to compare with (None for 'none'), after checking that its ids are the student's."""
    name = name or metadata.get("teacher")
    if name is None:
        raise UserError(
            "the checkpoint does not record its teacher: pass --teacher_model NAME, "
            "or --teacher_model none for student metrics only"
        )
    if name.lower() == NO_TEACHER:
        return None
    from pepemb.teacher import load_teacher  # transformers is heavy: import it only when needed

    teacher = load_teacher(name, device=device, use_8bit=use_8bit, trust_remote_code=trust_remote_code)
    if teacher.tokenizer.vocab_hash != tokenizer.vocab_hash:
        raise UserError(
            f"teacher {name} has a different vocabulary from the student (vocab hash "
            f"{teacher.tokenizer.vocab_hash} vs {tokenizer.vocab_hash}): their token ids do "
            f"not line up; pass the teacher the student was distilled from, or none"
        )
    return teacher


# --------------------------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure_speed(forward, model, batches: list[dict], device) -> dict:
    """Throughput of forward(input_ids, attention_mask) over the batches, after one warm-up
    batch (allocator, kernel selection and lazily built tables are first-call costs), and its
    peak memory: the weights' bytes plus the peak growth during the timed batches."""
    batches = [(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in batches]
    forward(*batches[0])
    synchronize(device)
    meter = PeakMemory(device)
    with meter:
        start = time.perf_counter()
        for ids, mask in batches:
            forward(ids, mask)
        synchronize(device)
        seconds = time.perf_counter() - start
    sequences = sum(ids.shape[0] for ids, _ in batches)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    weights = tensor_bytes(model.state_dict()) / MB
    return {
        "sequences_per_s": sequences / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "batches": len(batches),
        "sequences": sequences,
        "tokens": tokens,
        "weights_mb": weights,
        "activation_peak_mb": meter.growth_mb,
        "peak_memory_mb": weights + meter.growth_mb,
        "memory_measure": meter.measure,
    }


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(state) -> int:
    """Bytes of a state_dict's tensors, each storage once (tied weights), including the packed
    weights of torch's int8 Linear layers, which are not parameters."""
    seen, total = set(), 0

    def add(value):
        nonlocal total
        if isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        elif isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()

    for value in state.values():
        add(value)
    return total


class PeakMemory:
    """Peak memory growth while the block runs, in MB, and `measure`, saying how it was taken.

    CUDA: torch.cuda.max_memory_allocated above what was allocated at the start (exact, for
    torch's allocations). Linux CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above the resident set at the start; memory that the allocator kept
    from earlier batches is reused without growing it, so this can undercount. Elsewhere:
    growth of the lifetime peak (ru_maxrss), 0 when the block stays below an earlier peak.
    """

    def __init__(self, device):
        self.device, self.growth_mb, self.measure = device, 0.0, ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.measure = "CUDA max_memory_allocated growth over the timed batches"
        elif self._reset_linux_peak():
            self.start = _proc_status_kb("VmRSS") * 1024
            self.measure = "process peak RSS growth (Linux VmHWM, reset before timing); may undercount"
        else:
            self.start = _max_rss_bytes()
            self.measure = "growth of the process's lifetime peak RSS (ru_maxrss); 0 if below an earlier peak"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.measure.startswith("process peak RSS"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = _max_rss_bytes()
        self.growth_mb = max(peak - self.start, 0) / MB

    @staticmethod
    def _reset_linux_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def _proc_status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_outputs(report: dict, output_dir: Path) -> None:
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
    x = torch.arange(len(residues)).numpy()
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


if __name__ == "__main__":
    cli.run(main)
