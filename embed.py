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
writes a native transformers ESM-2 model (export.py): config.json, model.safetensors, the tokenizer
files and a model card; AutoModelForMaskedLM.from_pretrained and `architecture.load_student` read it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from architecture import StudentCheckpoint
from pepemb import cli, data, devices
from pepemb.cli import UserError
from pepemb.files import atomic_open, file_names
from pepemb.hf_export import export_native, read_eval_report
from pepemb.inference import DEFAULT_MAX_LENGTH, Embedded, Embedder, embed_sequences, load_embedder
from pepemb.options import add_device_arguments
from pepemb.progress import progress

MANIFEST_FORMAT = "pepemb-embeddings"
MANIFEST_FORMAT_VERSION = 1
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
    add_device_arguments(p, training=False)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue in an OUTPUT_DIR from an earlier run, skipping sequences already done",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the embeddings in OUTPUT_DIR")
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
    p.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow a Hub model to run its own code (off unless you trust it)",
    )
    return p


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
# Layers and windows
# --------------------------------------------------------------------------------------------


def absolute_layers(repr_layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer numbers in 0..num_layers (negative ones count from the end), duplicates dropped."""
    bad = [i for i in repr_layers if not -(num_layers + 1) <= i <= num_layers]
    if bad:
        raise UserError(
            f"--repr_layers {' '.join(map(str, bad))} out of range: the model has "
            f"{num_layers} layers, so use 0..{num_layers} (0 = embeddings) or "
            f"-{num_layers + 1}..-1 (-1 = last)"
        )
    return list(dict.fromkeys(i % (num_layers + 1) for i in repr_layers))


def window_sizes(args, embedder: Embedder) -> tuple[int, int]:
    """(residues per window, overlap between windows), checked against the model's limit."""
    limit = embedder.max_positions - 2
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, limit)
    if max_length > limit:
        raise UserError(
            f"--max_length {max_length} exceeds what {embedder.name} takes "
            f"({limit} residues plus start/end tokens); pass --max_length {limit} or less"
        )
    overlap = min(64, max_length // 4) if args.overlap is None else args.overlap
    if args.long == "chunk" and overlap >= max_length:
        raise UserError(f"--overlap {overlap} must be smaller than the window (--max_length {max_length})")
    return max_length, overlap


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def _write(path: Path, payload: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(payload)


def _sequence_hash(sequence: str) -> str:
    return hashlib.sha1(sequence.encode()).hexdigest()


def save_embedded(
    output_dir: Path, name: str, protein: data.Protein, result: Embedded, include: Sequence[str], teacher_map=None
) -> None:
    """per_tok/NAME (if asked), then partial/NAME: a sequence with a partial file is done. With
    a teacher map, also the last layer's mean mapped into the teacher's space (mean_teacher)."""
    if "per_tok" in include:
        arrays = {f"layer_{k}": v.numpy() for k, v in result.per_residue.items()}
        _write(
            output_dir / "per_tok" / f"{name}.safetensors", safetensors.numpy.save(arrays, metadata={"id": protein.id})
        )
    row = {}
    if "mean" in include:
        row.update({f"mean_layer_{k}": v.mean(0).numpy() for k, v in result.per_residue.items()})
    if "cls" in include:
        row.update({f"cls_layer_{k}": v.numpy() for k, v in result.cls.items()})
    if teacher_map is not None:
        last = result.per_residue[max(result.per_residue)].mean(0)
        with torch.no_grad():
            row["mean_teacher"] = teacher_map(last.to(next(teacher_map.parameters()).device)).float().cpu().numpy()
    residues = next(iter(result.per_residue.values())).shape[0]
    metadata = {
        "id": protein.id,
        "sequence_sha1": _sequence_hash(protein.sequence),
        "residues": str(residues),
        "windows": str(result.windows),
    }
    _write(output_dir / "partial" / f"{name}.safetensors", safetensors.numpy.save(row, metadata=metadata))


def partial_metadata(output_dir: Path, name: str) -> dict | None:
    """The metadata of partial/NAME, or None when there is no complete one."""
    path = output_dir / "partial" / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(path, "np") as f:
            return f.metadata()
    except Exception:  # safetensors raises its own error types; an unreadable file is not done
        return None


def is_done(output_dir: Path, name: str, protein: data.Protein, include: Sequence[str]) -> bool:
    """Whether an earlier run embedded this very sequence under this name (for --resume)."""
    metadata = partial_metadata(output_dir, name)
    return (
        metadata is not None
        and metadata.get("id") == protein.id
        and metadata.get("sequence_sha1") == _sequence_hash(protein.sequence)
        and ("per_tok" not in include or (output_dir / "per_tok" / f"{name}.safetensors").is_file())
    )


def write_embeddings_npz(
    output_dir: Path,
    proteins: Sequence[data.Protein],
    names: Sequence[str],
    layers: Sequence[int],
    include: Sequence[str],
) -> dict[str, tuple]:
    """embeddings.npz from the partial files, rows in input order; returns {array: shape}."""
    rows, residues = [], []
    for name in names:
        path = output_dir / "partial" / f"{name}.safetensors"
        rows.append(safetensors.numpy.load_file(path))
        residues.append(int(partial_metadata(output_dir, name)["residues"]))
    arrays = {"ids": np.array([p.id for p in proteins]), "lengths": np.array(residues, dtype=np.int64)}
    if "per_tok" in include:
        arrays["per_tok_files"] = np.array([f"per_tok/{name}.safetensors" for name in names])
    for kind in ("mean", "cls"):
        if kind in include:
            for layer in layers:
                key = f"{kind}_layer_{layer}"
                arrays[key] = np.stack([row[key] for row in rows]).astype(np.float32)
    if rows and "mean_teacher" in rows[0]:
        arrays["mean_teacher"] = np.stack([row["mean_teacher"] for row in rows]).astype(np.float32)
    with atomic_open(output_dir / "embeddings.npz", "wb") as handle:
        np.savez(handle, **arrays)
    return {k: list(v.shape) for k, v in arrays.items()}


OUTPUTS = ("manifest.json", "embeddings.npz", "partial", "per_tok")


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """The earlier run's manifest (to resume), None for a fresh start; refuses to mix runs."""
    manifest_path = output_dir / "manifest.json"
    if not manifest_path.is_file():
        if resume:
            print(f"--resume: no earlier run in {output_dir}; starting fresh")
        return None
    if not (resume or overwrite):
        raise UserError(
            f"{output_dir} already holds embeddings ({manifest_path}); pass --resume "
            "to continue that run, --overwrite to replace it, or another OUTPUT_DIR"
        )
    if overwrite:
        return None
    try:
        return json.loads(manifest_path.read_text())
    except ValueError as err:
        raise UserError(f"{manifest_path} is not valid JSON ({err}); use --overwrite") from None


def clear_outputs(output_dir: Path) -> None:
    """Remove this script's outputs (and nothing else) from output_dir."""
    for name in OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_manifest(output_dir: Path, manifest: dict) -> None:
    _write(output_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


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
    if output_dir is None:
        return None

    layers = absolute_layers(args.repr_layers, embedder.num_layers)
    if args.space == "teacher":
        if not embedder.is_student or embedder.model.teacher_map is None:
            raise UserError(
                f"--space teacher needs a student distilled with --embedding_weight; {args.model} has "
                "no map into its teacher's embedding space"
            )
        layers = list(dict.fromkeys([*layers, embedder.num_layers]))  # the map reads the last layer's mean
    max_length, overlap = window_sizes(args, embedder)
    include = [kind for kind in KINDS if kind in args.include]
    precision = str(autocast_dtype or torch.float32).replace("torch.", "")
    settings = {
        "model": embedder.name,
        "layers": layers,
        "include": include,
        "max_length": max_length,
        "long": args.long,
        "overlap": overlap if args.long == "chunk" else None,
        "precision": precision,
        **({"space": "teacher"} if args.space == "teacher" else {}),
    }
    if previous is not None and previous.get("settings") != settings:
        changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        raise UserError(
            f"{output_dir} holds embeddings made with other settings "
            f"({', '.join(changed) or 'format'} differ); rerun with the same options, "
            f"--overwrite, or another OUTPUT_DIR"
        )
    if previous is None:
        clear_outputs(output_dir)
    return embed_fasta(embedder, proteins, output_dir, settings, args, autocast_dtype)


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
    duplicates = {id_: n for id_, n in Counter(p.id for p in proteins).items() if n > 1}
    if duplicates:
        shown = ", ".join(f"{id_} ({n}x)" for id_, n in list(duplicates.items())[:5])
        print(
            f"note: {len(duplicates)} ids occur more than once: {shown}"
            f"{', ...' if len(duplicates) > 5 else ''}; all records are kept, with distinct file names"
        )
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
    max_length = settings["max_length"]
    start = time.perf_counter()
    residues_done = 0
    bar = progress(total=len(todo), desc="embed", unit="seq")
    for result in embed_sequences(
        embedder,
        [proteins[i].sequence for i in todo],
        settings["layers"],
        max_tokens=args.max_tokens,
        max_length=max_length,
        long=args.long,
        overlap=settings["overlap"] or 0,
        autocast_dtype=autocast_dtype,
    ):
        i = todo[result.index]
        save_embedded(
            output_dir,
            names[i],
            proteins[i],
            result,
            settings["include"],
            embedder.model.teacher_map if settings.get("space") == "teacher" else None,
        )
        residues_done += next(iter(result.per_residue.values())).shape[0]
        bar.update(1)
        bar.set_postfix(res_s=f"{residues_done / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    elapsed = time.perf_counter() - start

    arrays = write_embeddings_npz(output_dir, proteins, names, settings["layers"], settings["include"])
    too_long = sum(len(p.sequence) > max_length for p in proteins)
    manifest.update(
        {
            "complete": True,
            "model": {
                "name": embedder.name,
                "kind": "student" if embedder.is_student else "huggingface",
                "num_layers": embedder.num_layers,
                "num_parameters": sum(p.numel() for p in embedder.model.parameters()),
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
            "counts": {
                "sequences": len(proteins),
                "residues": int(sum(len(p.sequence) for p in proteins)),
                "embedded_this_run": len(todo),
                "already_done": len(proteins) - len(todo),
                "truncated": too_long if args.long == "truncate" else 0,
                "chunked": too_long if args.long == "chunk" else 0,
            },
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


if __name__ == "__main__":
    cli.run(main)
