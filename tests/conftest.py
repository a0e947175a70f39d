"""Shared fixtures: tiny random teachers with real vocabularies, and real sequences.

No test needs the network: HF_HUB_OFFLINE is set before transformers is imported, so a test that
tried to reach the Hub would fail at once instead of retrying for a minute. The AntiBERTy
conversion (about 100 MB) uses its default cache so that later runs reuse it.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # library bars stay out of test output

import pytest  # noqa: E402

from pepemb import data  # noqa: E402
from pepemb.teacher import save_random_teacher  # noqa: E402


@pytest.fixture(scope="session")
def antibody_proteins() -> list[data.Protein]:
    """The first 200 shipped antibody V domains (heavy/light alternating, 101-136 aa)."""
    return data.read_fasta(data.SHIPPED_ANTIBODIES)[:200]


@pytest.fixture(scope="session")
def uniprot_proteins() -> list[data.Protein]:
    """All 2,000 shipped UniProtKB proteins (7..8000 aa; rare residues read as X)."""
    return data.read_fasta(data.SHIPPED_UNIPROT)


def tiny_student(num_layers: int = 1) -> list[str]:
    """distill.py's size flags for the tests' student: d_model 32, 2 heads, `num_layers` blocks
    (about 13k parameters a block), small enough for a step in milliseconds on one core."""
    return ["--d_model", "32", "--num_heads", "2", "--num_layers", str(num_layers)]


def write_short_uniprot(path: Path, count: int, length: int) -> Path:
    """The first `count` shipped UniProt proteins cut to `length` residues: tiny, real training data."""
    proteins = data.read_fasta(data.SHIPPED_UNIPROT)[:count]
    data.write_fasta(path, [data.Protein(p.id, p.description, p.sequence[:length]) for p in proteins])
    return path


@pytest.fixture(scope="session")
def protbert_teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer, d=64 random BertForMaskedLM with ProtBert's exact 30-token vocabulary, initialised
    wider than BERT (0.2) so that its predictions are peaked and worth distilling."""
    return save_random_teacher(tmp_path_factory.mktemp("protbert_teacher"), kind="protbert", initializer_range=0.2)


@pytest.fixture(scope="session")
def esm_teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer, d=64 random EsmForMaskedLM with ESM-2's exact 33-token vocabulary."""
    return save_random_teacher(tmp_path_factory.mktemp("esm_teacher"), kind="esm2")


@pytest.fixture(scope="session")
def small_fasta(tmp_path_factory):
    """120 real UniProt sequences, cropped to 60 residues so that a step takes milliseconds."""
    return write_short_uniprot(tmp_path_factory.mktemp("data") / "small.fasta", 120, 60)


def tiny_args(teacher_dir, fasta, output_dir, *extra):
    """distill.py's arguments for a short run of the tiny student on `fasta`; `extra` comes last
    (a repeated flag overrides)."""
    return [
        "--data_path",
        str(fasta),
        "--output_dir",
        str(output_dir),
        "--teacher_model",
        str(teacher_dir),
        *tiny_student(num_layers=2),
        "--batch_size",
        "16",
        "--max_seq_len",
        "64",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
        "--log_every",
        "2",
        "--seed",
        "7",
        *extra,
    ]
