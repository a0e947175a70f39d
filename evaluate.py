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
from pathlib import Path

from architecture import load_student
from pepemb import cli, data
from pepemb.cli import UserError
from pepemb.data import MaskedBatches, Masking
from pepemb.devices import resolve_device
from pepemb.evaluation_report import summary_table, write_outputs
from pepemb.heldout import (
    EMBEDDING_PROTEINS,
    MUTATION_POSITIONS,
    MUTATION_PROTEINS,
    build_report,
    fidelity_measures,
    masked_statistics,
    residue_counts,
)
from pepemb.options import add_device_arguments
from pepemb.speed import compare_speed

DEFAULT_MAX_SEQ_LEN = 512
NO_TEACHER = "none"


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
    fidelity_counts = dict(
        mutation_proteins=mutation_proteins,
        mutation_positions=mutation_positions,
        embedding_proteins=embedding_proteins,
    )
    check_options(batch_size, max_tokens, mask_prob, max_sequences, speed_batches, max_seq_len, fidelity_counts)
    cli.writable_folder(output_dir, "--output_dir")  # before the work, not after it
    device = resolve_device(device)
    student, tokenizer, metadata = load_student(model_path, map_location=device)
    fasta, sequences = read_sequences(data_path, max_sequences)
    teacher = load_matching_teacher(teacher_model, metadata, tokenizer, device, use_8bit, trust_remote_code)
    max_seq_len = fit_max_seq_len(
        max_seq_len or metadata.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN, teacher, max_tokens
    )

    batching = Masking(
        max_seq_len=max_seq_len, mask_prob=mask_prob, seed=seed, max_tokens=max_tokens, batch_size=batch_size
    )
    masked_batches = MaskedBatches(sequences, tokenizer, batching, epoch=0, train=False)
    unmasked = masked_batches.unmasked()
    speed = None
    if speed_batches:
        speed = compare_speed(student, teacher, data.evenly_spaced(unmasked, speed_batches), device)
    stats = masked_statistics(student, teacher, masked_batches, device)
    fidelity = None
    if teacher is not None and (mutation_proteins and mutation_positions or embedding_proteins):
        fidelity = fidelity_measures(student, teacher, sequences, tokenizer, batching, device, **fidelity_counts)
    setup = {
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
    }
    report = {
        "setup": setup,
        "parameters": parameter_counts(student, teacher),
        **build_report(stats, residue_counts(unmasked, tokenizer), tokenizer, speed),
        "fidelity": fidelity,
    }
    write_outputs(report, Path(output_dir))
    return report


def check_options(
    batch_size, max_tokens, mask_prob, max_sequences, speed_batches, max_seq_len, fidelity_counts: dict
) -> None:
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("max_sequences", max_sequences)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be positive (got {value})")
    if speed_batches < 0:
        raise UserError(f"--speed_batches must not be negative (got {speed_batches})")
    if not 0 < mask_prob < 1:
        raise UserError(f"--mask_prob must be between 0 and 1 (got {mask_prob})")
    if max_seq_len is not None and max_seq_len < 3:
        raise UserError("--max_seq_len must leave room for start, end and one residue (>= 3)")
    for name, value in fidelity_counts.items():
        if value < 0:
            raise UserError(f"--{name} must not be negative (got {value})")


def fit_max_seq_len(max_seq_len: int, teacher, max_tokens: int | None) -> int:
    """max_seq_len lowered to what the teacher takes (with a note), checked against --max_tokens."""
    if teacher is not None and max_seq_len > teacher.max_positions:
        print(
            f"note: the teacher takes at most {teacher.max_positions} positions; "
            f"--max_seq_len {max_seq_len} lowered to {teacher.max_positions}"
        )
        max_seq_len = teacher.max_positions
    if max_tokens is not None and max_tokens < max_seq_len:
        raise UserError(f"--max_tokens {max_tokens} is smaller than --max_seq_len {max_seq_len}")
    return max_seq_len


def parameter_counts(student, teacher) -> dict:
    student_params = student.num_parameters()
    return {
        "student": student_params,
        "teacher": teacher.num_parameters if teacher else None,
        "compression": teacher.num_parameters / student_params if teacher else None,
    }


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


if __name__ == "__main__":
    cli.run(main)
