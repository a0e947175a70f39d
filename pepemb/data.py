"""Protein data: FASTA in and out, train/val/test splits, BERT masking and token-budget batching.

Every script reads sequences through `read_fasta` / `load_splits`, so bad input fails here, once,
with one line naming the file and line. The training-side helpers are vectorised torch:
  - `mask_tokens`: BERT's 15% / 80-10-10 masking of residue positions,
  - `batch_indices`: length-sorted batches under a token budget (ESM's toks_per_batch),
  - `collate`: crop, encode, pad to the batch's longest, mask; each sequence with its own seed,
  - `masked_batch`: sequences by index, masked as mask variant v prescribes (`mask_seeds`), so
    sequence j of variant v looks the same in any batch, epoch or run,
  - `Masking`: the settings of all of that; `MaskedBatches` / `batch_loader`: an epoch of such
    batches, built by DataLoader workers; `unmasked_batch`: sequences as models see them to embed.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from pepemb.cli import UserError
from pepemb.files import atomic_open

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the repository's data/ folder
SHIPPED_UNIPROT = DATA_DIR / "uniprot_sample.fasta"
SHIPPED_ANTIBODIES = DATA_DIR / "antibody_sample.fasta"
SPLIT_NAMES = ("train", "val", "test")

IGNORE_INDEX = -100  # label of positions the MLM loss skips (torch's cross_entropy default)
VALIDATION_VARIANT = -1  # the mask variant of fixed evaluation masks; training variants are 0, 1, ...


@dataclass(frozen=True)
class Protein:
    id: str
    description: str
    sequence: str


# --------------------------------------------------------------------------------------------
# FASTA
# --------------------------------------------------------------------------------------------

# ProtBert's convention: selenocysteine (U), pyrrolysine (O) and the ambiguity codes B, Z -> X.
_RARE_TO_X = bytes.maketrans(b"UZOB", b"XXXX")
_SEQUENCE_LINE = re.compile(rb"[A-Za-z]*\*?")
_NOT_RESIDUE = re.compile(rb"[^A-Za-z]")


def write_fasta(path: str | Path, proteins: Sequence[Protein]) -> None:
    """Write one header line and one sequence line per protein, atomically."""
    with atomic_open(path, "w") as handle:
        for p in proteins:
            header = f"{p.id} {p.description}" if p.description else p.id
            handle.write(f">{header}\n{p.sequence}\n")


def read_fasta(
    path: str | Path, min_length: int = 1, drop_duplicates: bool = True, stats: dict | None = None
) -> list[Protein]:
    """Proteins of a plain or gzipped FASTA file, in file order.

    Sequences are upper-cased, a terminal '*' is dropped and U/Z/O/B become X. Sequences shorter
    than `min_length` and (with `drop_duplicates`) repeats of an earlier sequence are skipped.
    `stats`, when given, receives the counts: records, kept, too_short, duplicates, rare_to_x
    (residues replaced). Anything that is not a readable protein FASTA raises `UserError`.
    """
    path = Path(path)
    counts = dict(records=0, kept=0, too_short=0, duplicates=0, rare_to_x=0)
    proteins, seen = [], set()
    for header, residues in _records(path):
        counts["records"] += 1
        residues = residues.upper()
        rare = sum(residues.count(letter) for letter in b"UZOB")
        sequence = residues.translate(_RARE_TO_X).decode("ascii")
        if len(sequence) < min_length:
            counts["too_short"] += 1
            continue
        if drop_duplicates:
            if sequence in seen:
                counts["duplicates"] += 1
                continue
            seen.add(sequence)
        counts["rare_to_x"] += rare
        counts["kept"] += 1
        id_, *description = header.split(maxsplit=1)
        proteins.append(Protein(id_, "".join(description), sequence))
    if counts["records"] == 0:
        raise UserError(f"{path}: no FASTA records (no line starts with '>')")
    if stats is not None:
        stats.update(counts)
    return proteins


def _records(path: Path) -> Iterator[tuple[str, bytes]]:
    """(header without '>', residue bytes) per record; raises UserError naming file and line."""
    header, chunks, terminated = None, [], False
    for lineno, line in _lines(path):
        where = f"{path}, line {lineno}"
        if line.startswith(b">"):
            if header is not None:
                yield header, b"".join(chunks)
            header = line[1:].decode("utf-8", errors="replace").strip()
            if not header:
                raise UserError(f"{where}: header '>' has no sequence id")
            chunks, terminated = [], False
        elif line:
            if header is None:
                raise UserError(f"{where}: sequence data before the first '>' header (is this a FASTA file?)")
            if terminated:
                raise UserError(f"{where}: residues after the terminal '*' of {header.split()[0]}")
            if not _SEQUENCE_LINE.fullmatch(line):
                raise UserError(
                    f"{where}: {_bad_character(line)} in sequence "
                    f"{header.split()[0]}; only amino-acid letters A-Z are allowed"
                )
            terminated = line.endswith(b"*")
            chunks.append(line.rstrip(b"*"))
    if header is not None:
        yield header, b"".join(chunks)


def _bad_character(line: bytes) -> str:
    char = chr(line[_NOT_RESIDUE.search(line).start()])
    if char in "-.":
        return f"alignment gap {char!r} (remove gaps: sequences must be unaligned)"
    return f"invalid character {char!r}"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped line) of a plain or gzipped text file, without a UTF-8 BOM.

    Gzip is recognised by its magic bytes, not by the file name.
    """
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a FASTA file")
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    corrupt_gzip = (OSError, EOFError, zlib.error) if gzipped else ()
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
            head = handle.peek(8192)[:8192]
            if not head:
                raise UserError(f"{path}: file is empty")
            if _looks_binary(head):
                raise UserError(f"{path}: binary content, not a FASTA text file")
            for lineno, raw in enumerate(handle, 1):
                yield lineno, (raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw).strip()
    except corrupt_gzip as err:
        raise UserError(f"{path}: corrupt or truncated gzip file ({err})") from None


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start < len(head) - 3  # a multi-byte character cut by the 8 KiB window is fine
    return False


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_proteins(proteins: Sequence[Protein], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0):
    """(train, val, test): a seeded random partition; each part keeps the input order.

    A split with a positive fraction gets round(n * fraction) proteins, and at least one.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"val/test fractions must be in [0, 1) and sum to < 1, got {val_fraction} and {test_fraction}")
    n = len(proteins)
    n_val, n_test = (max(1, round(n * f)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if n_val + n_test >= n:
        raise UserError(
            f"{n} sequences are too few for a split with val_fraction {val_fraction} "
            f"and test_fraction {test_fraction}; provide more sequences"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return tuple([proteins[i] for i in sorted(part)] for part in (train, val, test))


def load_splits(
    data_path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, min_length: int = 1
) -> dict[str, list[Protein]]:
    """{"train", "val", "test"} proteins from a split folder or from one FASTA file.

    A folder must hold train.fasta, val.fasta and test.fasta (download_sample_data.py writes
    them; the fraction arguments are then unused). A single file is split with
    `split_proteins(val_fraction, test_fraction, seed)`.
    """
    data_path = Path(data_path)
    if not data_path.exists():
        raise UserError(
            f"{data_path}: no such file or folder; pass a FASTA file or a folder made by download_sample_data.py"
        )
    if data_path.is_file():
        proteins = read_fasta(data_path, min_length=min_length)
        splits = dict(zip(SPLIT_NAMES, split_proteins(proteins, val_fraction, test_fraction, seed)))
    else:
        files = {name: data_path / f"{name}.fasta" for name in SPLIT_NAMES}
        missing = [f.name for f in files.values() if not f.is_file()]
        if missing:
            raise UserError(
                f"{data_path}: missing {', '.join(missing)}; a data folder needs "
                "train.fasta, val.fasta and test.fasta (see download_sample_data.py)"
            )
        # A split written with fraction 0 is an empty file, which read_fasta rightly rejects.
        splits = {name: read_fasta(f, min_length=min_length) if f.stat().st_size else [] for name, f in files.items()}
    if not splits["train"]:
        raise UserError(f"{data_path}: no training sequences of at least {min_length} residues")
    return splits


# --------------------------------------------------------------------------------------------
# Masking, batching, collation
# --------------------------------------------------------------------------------------------


def mask_tokens(input_ids: torch.Tensor, tokenizer, mask_prob: float = 0.15, generator: torch.Generator | None = None):
    """BERT masking of residue positions -> (masked_ids, labels).

    Each residue position (never a special or pad token) is chosen with probability
    `mask_prob`; chosen positions become the mask token (80%), a random standard residue (10%)
    or stay unchanged (10%). labels hold the original id at chosen positions and -100 elsewhere.
    With mask_prob > 0 every row that has a residue gets at least one chosen position (its
    lowest random draw), so no sequence contributes an empty loss.
    """
    draws = torch.rand((3, *input_ids.shape), generator=generator, device=input_ids.device)
    return _mask_with_draws(input_ids, tokenizer, mask_prob, draws)


def _mask_with_draws(input_ids: torch.Tensor, tokenizer, mask_prob: float, draws: torch.Tensor):
    """mask_tokens given its uniform draws [3, B, L]: draws[0] chooses the positions, draws[1]
    mask / random residue / keep, draws[2] the random residue."""
    device = input_ids.device
    specials = torch.tensor(tokenizer.special_ids, device=device)
    candidates = ~torch.isin(input_ids, specials)
    chosen = (draws[0] < mask_prob) & candidates
    if mask_prob > 0:
        forced = draws[0].masked_fill(~candidates, 2.0).argmin(dim=1)
        rows = candidates.any(dim=1).nonzero().squeeze(1)
        chosen[rows, forced[rows]] = True

    action = draws[1]
    residue_ids = torch.tensor(tokenizer.residue_ids, device=device)
    # float32 u * n can round up to n itself: clamp to the last index
    random_residues = residue_ids[(draws[2] * len(residue_ids)).long().clamp(max=len(residue_ids) - 1)]
    masked = torch.where(chosen & (action < 0.8), tokenizer.mask_id, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_residues, masked)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    return masked, labels


def mask_seeds(seed: int, variant: int, indices: Iterable[int]) -> list[int]:
    """The generator seed of each sequence in `indices` under mask variant `variant`: a hash of
    (seed, variant, index), so that every (variant, sequence) pair has its own crop and mask."""
    return [
        int.from_bytes(hashlib.blake2b(f"{seed}:{variant}:{j}".encode(), digest_size=8).digest(), "little") >> 1
        for j in indices
    ]


def token_lengths(sequences: Sequence[str], max_seq_len: int) -> list[int]:
    """Tokens per sequence after cropping to `max_seq_len`, cls and eos included."""
    return [min(len(s), max_seq_len - 2) + 2 for s in sequences]


def batch_indices(
    lengths: Sequence[int],
    max_tokens: int | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Batches of indices into `lengths` (token counts), grouped by similar length.

    Indices are sorted by length and cut into batches either of `batch_size` or, with
    `max_tokens`, as large as keeps longest-in-batch * batch-size <= max_tokens (a single longer
    sequence gets a batch of its own). With `shuffle`, ties in length and the order of the
    batches are shuffled by a generator seeded with (seed, epoch): the same arguments always
    give the same batches. Every index appears exactly once.
    """
    if (max_tokens is None) == (batch_size is None):
        raise UserError("give exactly one of --max_tokens and --batch_size")
    if (max_tokens or batch_size) < 1:
        raise UserError(f"--max_tokens / --batch_size must be positive, got {max_tokens or batch_size}")
    lengths = [int(n) for n in lengths]
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lengths.__getitem__)  # stable: equal lengths keep the shuffled order

    if batch_size is not None:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches, current = [], []
        for i in order:  # ascending, so the newcomer is the longest in the batch
            if current and (len(current) + 1) * lengths[i] > max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Real tokens / tokens after padding each batch to its longest member (1.0 if no tokens)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    return real / padded if padded else 1.0


def collate(
    sequences: Sequence[str],
    tokenizer,
    max_seq_len: int,
    mask_prob: float = 0.15,
    seeds: Sequence[int] | None = None,
    random_crop: bool = True,
) -> dict:
    """Crop, encode, pad to the batch's longest and mask -> dict(input_ids, attention_mask, labels).

    Sequence i is cropped and masked with its own generator, seeded with seeds[i] (None: seeds
    drawn from torch's global RNG): its first draw places the crop window, the next 3 per token
    mask it. Nothing else enters, so a sequence comes out the same in any batch, at any padding.
    Sequences longer than max_seq_len - 2 residues are cropped to a window: a random one with
    `random_crop`, else the N-terminal one, for evaluation. input_ids are the masked ids; labels
    are as `mask_tokens` makes them.
    """
    window = max_seq_len - 2
    if window < 1:
        raise UserError(f"--max_seq_len must be at least 3 (cls, one residue, eos), got {max_seq_len}")
    if seeds is None:
        seeds = torch.randint(2**62, (len(sequences),)).tolist()
    if len(seeds) != len(sequences):
        raise ValueError(f"{len(seeds)} seeds for {len(sequences)} sequences")
    lengths = token_lengths(sequences, max_seq_len)
    row_draws = [
        torch.rand(1 + 3 * n, generator=torch.Generator().manual_seed(int(seed))) for seed, n in zip(seeds, lengths)
    ]
    windows = [len(s) - min(len(s), window) + 1 for s in sequences]  # possible crop starts
    starts = [int(float(u[0]) * w) if random_crop else 0 for u, w in zip(row_draws, windows)]
    cropped = [s[start : start + window] for s, start in zip(sequences, starts)]
    input_ids, attention_mask = tokenizer.batch_encode(cropped)
    draws = torch.ones((3, *input_ids.shape))  # a draw of 1 never chooses a position: padding
    for row, (u, n) in enumerate(zip(row_draws, lengths)):
        draws[:, row, :n] = u[1:].view(3, n)
    masked, labels = _mask_with_draws(input_ids, tokenizer, mask_prob, draws)
    return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


def masked_batch(
    sequences: Sequence[str],
    indices: Sequence[int],
    tokenizer,
    max_seq_len: int,
    mask_prob: float,
    seed: int,
    variant: int,
) -> dict:
    """collate of sequences[indices], each masked as mask variant `variant` prescribes (training
    variants 0, 1, ... crop a random window; VALIDATION_VARIANT the N-terminal one), plus
    "sequence_index": the indices, a LongTensor [B]."""
    batch = collate(
        [sequences[j] for j in indices],
        tokenizer,
        max_seq_len,
        mask_prob,
        seeds=mask_seeds(seed, variant, indices),
        random_crop=variant != VALIDATION_VARIANT,
    )
    batch["sequence_index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


def kl_positions(labels: torch.Tensor, attention_mask: torch.Tensor, distill_positions: str) -> torch.Tensor:
    """Where the distillation term is taken, [B, L] bool: the masked positions, or ("all") every
    non-pad one."""
    if distill_positions == "masked":
        return labels != IGNORE_INDEX
    if distill_positions == "all":
        return attention_mask.bool()
    raise ValueError(f"distill_positions must be 'masked' or 'all', not {distill_positions!r}")


def load_sequences(
    data_path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """The training and validation sequences of a split folder or FASTA file (`load_splits`)."""
    splits = load_splits(data_path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    train_seqs = [p.sequence for p in splits["train"]]
    val_seqs = [p.sequence for p in splits["val"]]
    if not train_seqs or not val_seqs:
        raise UserError(
            f"{data_path}: need training and validation sequences (got {len(train_seqs)} and {len(val_seqs)})"
        )
    return train_seqs, val_seqs


@dataclass(frozen=True)
class Masking:
    """How sequences become batches: crop length (tokens, start and end included), masked
    fraction, the seed of batch order and masks, and batches of `batch_size` sequences or, with
    `max_tokens`, under a token budget."""

    max_seq_len: int
    mask_prob: float = 0.15
    seed: int = 0
    max_tokens: int | None = None
    batch_size: int = 32


def unmasked_batch(sequences: Sequence[str], tokenizer, max_seq_len: int) -> dict:
    """The sequences as a model sees them to embed or score them: the N-terminal crop, no mask."""
    return collate(sequences, tokenizer, max_seq_len, mask_prob=0.0, random_crop=False)


class MaskedBatches(Dataset):
    """The batches of one epoch, (seed, epoch) deciding which sequences go together; each
    sequence is cropped and masked by its own generator, seeded by (seed, mask variant, its
    index), so it looks the same in any batch, on any worker, after a resume. The mask variant
    is `mask_variant` (default: the epoch) in training, VALIDATION_VARIANT otherwise."""

    def __init__(
        self, sequences, tokenizer, masking: Masking, epoch: int, train: bool, mask_variant: int | None = None
    ):
        self.sequences, self.tokenizer, self.epoch, self.train = sequences, tokenizer, epoch, train
        self.max_seq_len, self.mask_prob, self.seed = masking.max_seq_len, masking.mask_prob, masking.seed
        self.mask_variant = (epoch if mask_variant is None else mask_variant) if train else VALIDATION_VARIANT
        lengths = token_lengths(sequences, self.max_seq_len)
        self.batches = batch_indices(
            lengths,
            max_tokens=masking.max_tokens,
            batch_size=None if masking.max_tokens else masking.batch_size,
            shuffle=train,
            seed=masking.seed,
            epoch=epoch,
        )
        self.padding_efficiency = padding_efficiency(self.batches, lengths)

    def unmasked(self) -> list[dict]:
        """The same batches, unmasked (`unmasked_batch`): what the models see when they embed proteins."""
        return [
            unmasked_batch([self.sequences[j] for j in batch], self.tokenizer, self.max_seq_len)
            for batch in self.batches
        ]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return masked_batch(
            self.sequences,
            self.batches[i],
            self.tokenizer,
            self.max_seq_len,
            self.mask_prob,
            self.seed,
            self.mask_variant,
        )


def batch_loader(dataset: MaskedBatches, batch_numbers, num_workers: int) -> DataLoader:
    """Batches `batch_numbers` of the dataset, in that order, built by num_workers processes."""
    # An explicit generator keeps the DataLoader from drawing on the global RNG, which dropout
    # uses: otherwise a resumed run would see different dropout masks.
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=batch_numbers,
        num_workers=num_workers,
        generator=torch.Generator(),
        persistent_workers=False,
    )


def evenly_spaced(items: list, count: int) -> list:
    """`count` items evenly spaced over the list, first included (all of them for 0, or for a
    count of at least the list's length): every length of sorted batches, every part of a sequence."""
    if not count or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]
