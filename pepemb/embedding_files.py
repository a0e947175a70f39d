"""embed.py's output folder: per-sequence files written as each sequence is embedded (partial/NAME,
and per_tok/NAME with per_tok), the --resume bookkeeping that finds them again, embeddings.npz
gathered from them in input order, and manifest.json. Every file is written atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.numpy
import torch
from safetensors import safe_open

from pepemb import data
from pepemb.cli import UserError
from pepemb.files import atomic_open
from pepemb.inference import Embedded, Embedder, embed_sequences
from pepemb.progress import progress

MANIFEST_FORMAT = "pepemb-embeddings"
MANIFEST_FORMAT_VERSION = 1


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


def check_same_settings(previous: dict, settings: dict, output_dir: Path) -> None:
    """Refuse to resume a run in output_dir whose manifest records other settings."""
    if previous.get("settings") != settings:
        changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
        raise UserError(
            f"{output_dir} holds embeddings made with other settings "
            f"({', '.join(changed) or 'format'} differ); rerun with the same options, "
            f"--overwrite, or another OUTPUT_DIR"
        )


def embed_to_files(
    embedder: Embedder,
    proteins: Sequence[data.Protein],
    names: Sequence[str],
    output_dir: Path,
    settings: dict,
    *,
    max_tokens: int,
    autocast_dtype: torch.dtype | None,
) -> int:
    """Embed each protein into its partial (and per_tok) file under its name, with a progress bar;
    returns the residues embedded. `settings` is the manifest's: layers, include, max_length,
    long, overlap and, for teacher-space means, space."""
    teacher_map = embedder.model.teacher_map if settings.get("space") == "teacher" else None
    start = time.perf_counter()
    residues_done = 0
    bar = progress(total=len(proteins), desc="embed", unit="seq")
    for result in embed_sequences(
        embedder,
        [p.sequence for p in proteins],
        settings["layers"],
        max_tokens=max_tokens,
        max_length=settings["max_length"],
        long=settings["long"],
        overlap=settings["overlap"] or 0,
        autocast_dtype=autocast_dtype,
    ):
        i = result.index
        save_embedded(output_dir, names[i], proteins[i], result, settings["include"], teacher_map)
        residues_done += next(iter(result.per_residue.values())).shape[0]
        bar.update(1)
        bar.set_postfix(res_s=f"{residues_done / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    return residues_done
