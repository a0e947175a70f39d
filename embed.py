"""Embed protein sequences with a PepEmb student or any HuggingFace masked protein LM.

    python embed.py checkpoints/best_model proteins.fasta embeddings/ \
        --include mean per_tok --repr_layers -1 --max_tokens 8192

Modelled on ESM's scripts/extract.py. MODEL is a student checkpoint (its folder or model.pt), a
folder written by --export_hf, or a HuggingFace masked LM (Hub id, save_pretrained folder, or
"antiberty"). Sequences are sorted by length and batched under a token budget.

Layers: 0 is the embedding output, N the last of an N-layer model (after the final LayerNorm,
as in ESM); negative numbers count from the end, so -1 is the last. Files name layers by their
absolute index, e.g. mean_layer_4 for the last layer of a 4-layer student.

Sequences longer than --max_length residues are cut into overlapping windows, each framed by
start/end tokens (--long chunk, the default), and the per-residue embeddings of the windows are
averaged where they overlap; or only the first --max_length residues are embedded (--long truncate).

OUTPUT_DIR receives
    embeddings.npz   ids, lengths (residues embedded) and one [N, D] float32 array per kind and
                     layer (mean_layer_K: mean over residues, special tokens excluded; cls_layer_K:
                     the start token of the first window), rows in FASTA order; with per_tok also
                     per_tok_files (the file of each row)
    per_tok/NAME.safetensors   per sequence: layer_K arrays [residues, D] float32 (--include per_tok)
    partial/NAME.safetensors   per sequence: its rows of embeddings.npz, so --resume skips it
    manifest.json    model, layers, options, counts, embedding dim, dtype, duplicate ids
NAME is the sequence id with characters other than letters, digits, '.', '_' and '-' replaced
by '_', plus '-' and a short hash when the id was changed or the name is taken (duplicate ids).
Every file is written to a temporary name and renamed, so none is ever half-written.

    python embed.py checkpoints/best_model --export_hf pepemb-hf/ [--eval_report outputs/evaluation]
writes a native transformers ESM-2 model (pepemb/hf_export.py): config.json, model.safetensors, the tokenizer
files and a model card; AutoModelForMaskedLM.from_pretrained and `architecture.load_student` read it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from architecture import StudentCheckpoint
from pepemb import cli, data, devices
from pepemb.cli import UserError
from pepemb.embedding_files import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    check_output_dir,
    check_same_settings,
    clear_outputs,
    embed_to_files,
    is_done,
    write_embeddings_npz,
    write_manifest,
)
from pepemb.files import file_names
from pepemb.hf_export import export_native, read_eval_report
from pepemb.inference import DEFAULT_MAX_LENGTH, Embedder, absolute_layers, load_embedder, window_sizes
from pepemb.options import add_device_arguments

KINDS = ("mean", "per_tok", "cls")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "model",
        help="student checkpoint (folder or model.pt), a folder written by --export_hf, "
        "or a HuggingFace masked LM (Hub id, local folder, 'antiberty')",
    )
    p.add_argument("fasta", nargs="?", help="FASTA file of proteins to embed (plain or gzipped)")
    p.add_argument("output_dir", nargs="?", help="folder for embeddings.npz, per_tok/ and manifest.json")
    p.add_argument(
        "--include",
        nargs="+",
        choices=KINDS,
        default=["mean"],
        help="mean: mean over residues; per_tok: one embedding per residue; cls: the start token",
    )
    p.add_argument(
        "--repr_layers",
        type=int,
        nargs="+",
        default=[-1],
        help="layers to return: 0 = embeddings, N = last; negative counts from the end",
    )
    p.add_argument(
        "--space",
        choices=["student", "teacher"],
        default="student",
        help="teacher: also write mean_teacher, each protein's embedding mapped into the teacher's "
        "embedding space by the map a student distilled with --embedding_weight carries",
    )
    add_window_arguments(p)
    add_device_arguments(p, training=False)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue in an OUTPUT_DIR from an earlier run, skipping sequences already done",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the embeddings in OUTPUT_DIR")
    add_export_arguments(p)
    p.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow a Hub model to run its own code (off unless you trust it)",
    )
    return p


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    """The token budget, and how much of a long sequence each forward pass reads."""
    p.add_argument(
        "--max_tokens",
        type=int,
        default=8192,
        help="token budget per batch (padding included), like ESM's toks_per_batch; "
        "a longer window gets a batch of its own",
    )
    p.add_argument(
        "--max_length",
        type=int,
        default=None,
        help=f"residues per forward pass (default {DEFAULT_MAX_LENGTH}, or the model's "
        f"position limit minus start/end tokens if lower)",
    )
    p.add_argument(
        "--long",
        choices=["chunk", "truncate"],
        default="chunk",
        help="longer sequences: overlapping windows averaged, or the first --max_length residues",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="residues shared by consecutive windows with --long chunk (default min(64, max_length // 4))",
    )


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """--export_hf and what goes into its model card."""
    p.add_argument(
        "--export_hf",
        metavar="DIR",
        default=None,
        help="also write the student to DIR as a native transformers ESM-2 model (config.json, "
        "model.safetensors, tokenizer files, model card): AutoModelForMaskedLM, AutoTokenizer and "
        "pipeline('fill-mask') load it without this repository",
    )
    p.add_argument(
        "--eval_report",
        metavar="PATH",
        default=None,
        help="with --export_hf: evaluate.py's report.json (or its folder), whose held-out metrics go "
        "into the model card",
    )


def validate_args(args) -> None:
    """Every flag problem that needs no model, found before one is loaded."""
    if (args.fasta is None) != (args.output_dir is None):
        raise UserError("give both FASTA and OUTPUT_DIR (or neither, with --export_hf only)")
    if args.fasta is None and args.export_hf is None:
        raise UserError("nothing to do: give FASTA and OUTPUT_DIR, or --export_hf DIR")
    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be positive (got {args.max_tokens})")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max_length must be positive (got {args.max_length})")
    if args.overlap is not None and args.overlap < 0:
        raise UserError(f"--overlap must not be negative (got {args.overlap})")
    if args.fp16 and args.bf16:
        raise UserError("choose one of --fp16 and --bf16")
    if args.resume and args.overwrite:
        raise UserError("choose one of --resume (continue) and --overwrite (start again)")


def resolve_precision(args, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. Half precision on CPU would be slow and lossy: fp32 there."""
    if device.type == "cpu" and (args.fp16 or args.bf16):
        warnings.warn(f"--{'fp16' if args.fp16 else 'bf16'} needs a GPU; embedding in fp32 on CPU", stacklevel=2)
        return None
    return devices.resolve_precision(args.fp16, args.bf16, device)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    output_dir = cli.writable_folder(args.output_dir, "OUTPUT_DIR") if args.output_dir else None
    if args.export_hf:
        cli.writable_folder(args.export_hf, "--export_hf")
    previous = check_output_dir(output_dir, args.resume, args.overwrite) if output_dir else None
    proteins = data.read_fasta(args.fasta, drop_duplicates=False) if args.fasta else []

    device = devices.resolve_device(args.device)
    autocast_dtype = resolve_precision(args, device)
    embedder = load_embedder(
        args.model, device, half=autocast_dtype == torch.float16, trust_remote_code=args.trust_remote_code
    )
    if args.export_hf:
        export_student(embedder, args, argv)
    if output_dir is None:
        return None
    settings = embedding_settings(embedder, args, autocast_dtype)
    if previous is not None:
        check_same_settings(previous, settings, output_dir)
    else:
        clear_outputs(output_dir)
    return embed_fasta(embedder, proteins, output_dir, settings, args, autocast_dtype)


def export_student(embedder: Embedder, args, argv) -> None:
    """--export_hf: the student as a native transformers ESM-2 model, its command in the model card."""
    if not embedder.is_student:
        raise UserError(f"--export_hf needs a student checkpoint; {args.model} is a HuggingFace model")
    command = shlex.join(["python", "embed.py", *(sys.argv[1:] if argv is None else map(str, argv))])
    export_native(
        StudentCheckpoint(embedder.model, embedder.tokenizer, embedder.metadata),
        args.export_hf,
        read_eval_report(args.eval_report),
        command,
    )
    print(
        f"exported {embedder.model.summary()} to {args.export_hf} as a transformers ESM model "
        "(AutoModelForMaskedLM.from_pretrained loads it)"
    )


def embedding_settings(embedder: Embedder, args, autocast_dtype: torch.dtype | None) -> dict:
    """What the embeddings depend on (the manifest's settings, which --resume must match)."""
    layers = absolute_layers(args.repr_layers, embedder.num_layers)
    if args.space == "teacher":
        if not embedder.is_student or embedder.model.teacher_map is None:
            raise UserError(
                f"--space teacher needs a student distilled with --embedding_weight; {args.model} has "
                "no map into its teacher's embedding space"
            )
        layers = list(dict.fromkeys([*layers, embedder.num_layers]))  # the map reads the last layer's mean
    max_length, overlap = window_sizes(embedder, args.max_length, args.overlap, args.long)
    return {
        "model": embedder.name,
        "layers": layers,
        "include": [kind for kind in KINDS if kind in args.include],
        "max_length": max_length,
        "long": args.long,
        "overlap": overlap if args.long == "chunk" else None,
        "precision": str(autocast_dtype or torch.float32).replace("torch.", ""),
        **({"space": "teacher"} if args.space == "teacher" else {}),
    }


def embed_fasta(
    embedder: Embedder,
    proteins: Sequence[data.Protein],
    output_dir: Path,
    settings: dict,
    args,
    autocast_dtype: torch.dtype | None,
) -> dict:
    """Embed the proteins not done yet, then write embeddings.npz and the final manifest."""
    names = file_names([p.id for p in proteins])
    duplicates = duplicate_ids(proteins)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "complete": False,
        "settings": settings,
        "fasta": str(args.fasta),
        "repr_layers": args.repr_layers,
        "max_tokens": args.max_tokens,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(output_dir, manifest)

    todo = [
        i for i, (p, name) in enumerate(zip(proteins, names)) if not is_done(output_dir, name, p, settings["include"])
    ]
    if len(todo) < len(proteins):
        print(f"resume: {len(proteins) - len(todo)} of {len(proteins)} sequences already embedded")
    start = time.perf_counter()
    residues_done = embed_to_files(
        embedder,
        [proteins[i] for i in todo],
        [names[i] for i in todo],
        output_dir,
        settings,
        max_tokens=args.max_tokens,
        autocast_dtype=autocast_dtype,
    )
    elapsed = time.perf_counter() - start

    arrays = write_embeddings_npz(output_dir, proteins, names, settings["layers"], settings["include"])
    manifest.update(
        {
            "complete": True,
            **model_description(embedder, settings),
            "counts": run_counts(proteins, len(todo), settings),
            "duplicate_ids": duplicates,
            "arrays": arrays,
            "elapsed_s": elapsed,
            "sequences_per_s": len(todo) / elapsed if todo else None,
            "residues_per_s": residues_done / elapsed if todo else None,
        }
    )
    write_manifest(output_dir, manifest)
    print(
        f"embedded {len(todo)} sequences ({residues_done} residues) in {elapsed:.1f} s; "
        f"{len(proteins)} rows in {output_dir / 'embeddings.npz'}"
    )
    return manifest


def duplicate_ids(proteins: Sequence[data.Protein]) -> dict[str, int]:
    """{id: records} of the ids that occur more than once, with a note: all records are kept."""
    duplicates = {id_: n for id_, n in Counter(p.id for p in proteins).items() if n > 1}
    if duplicates:
        shown = ", ".join(f"{id_} ({n}x)" for id_, n in list(duplicates.items())[:5])
        print(
            f"note: {len(duplicates)} ids occur more than once: {shown}"
            f"{', ...' if len(duplicates) > 5 else ''}; all records are kept, with distinct file names"
        )
    return duplicates


def model_description(embedder: Embedder, settings: dict) -> dict:
    """The manifest's model, device, embedding_dim, dtype (and teacher_embedding_dim) entries."""
    return {
        "model": {
            "name": embedder.name,
            "kind": "student" if embedder.is_student else "huggingface",
            "num_layers": embedder.num_layers,
            "num_parameters": embedder.num_parameters,
            "vocab_hash": embedder.tokenizer.vocab_hash,
        },
        "device": str(embedder.device),
        "embedding_dim": embedder.hidden_size,
        "dtype": "float32",
        **(
            {"teacher_embedding_dim": embedder.model.config.teacher_hidden_size}
            if settings.get("space") == "teacher"
            else {}
        ),
    }


def run_counts(proteins: Sequence[data.Protein], embedded: int, settings: dict) -> dict:
    too_long = sum(len(p.sequence) > settings["max_length"] for p in proteins)
    return {
        "sequences": len(proteins),
        "residues": int(sum(len(p.sequence) for p in proteins)),
        "embedded_this_run": embedded,
        "already_done": len(proteins) - embedded,
        "truncated": too_long if settings["long"] == "truncate" else 0,
        "chunked": too_long if settings["long"] == "chunk" else 0,
    }


if __name__ == "__main__":
    cli.run(main)
