"""data.py: FASTA parsing and its error messages, splits, masking rates, batching, collation."""

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architecture import ResidueTokenizer
from pepemb import data
from pepemb.cli import UserError
from pepemb.data import Protein

REPO = Path(__file__).resolve().parent.parent

PROTBERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"LAGVESIKRDTPNQFYMHCWXUBZO"]


@pytest.fixture(scope="module")
def tok():
    return ResidueTokenizer.from_vocab(PROTBERT_VOCAB)


def write(path, content: bytes):
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------------------------
# read_fasta / write_fasta
# --------------------------------------------------------------------------------------------

MESSY = (
    b"\xef\xbb\xbf>sp|P1|ONE first protein\r\nmkt\r\naiL*\r\n\r\n"
    b">P2\nACDUZOB\n"
    b">P3 duplicate of one\nMKTAIL\n"
    b">P4\tshort\nMK\n"
    b">P5 empty\n"
)


def test_read_fasta_normalises_and_counts(tmp_path):
    stats = {}
    proteins = data.read_fasta(write(tmp_path / "m.fasta", MESSY), min_length=3, stats=stats)
    assert proteins == [Protein("sp|P1|ONE", "first protein", "MKTAIL"), Protein("P2", "", "ACDXXXX")]
    assert stats == dict(records=5, kept=2, too_short=2, duplicates=1, rare_to_x=4)


def test_read_fasta_keeps_duplicates_when_asked(tmp_path):
    proteins = data.read_fasta(write(tmp_path / "m.fasta", MESSY), drop_duplicates=False)
    assert [p.id for p in proteins] == ["sp|P1|ONE", "P2", "P3", "P4"]
    assert proteins[3].description == "short"


def test_read_fasta_gzip_detected_by_magic_not_name(tmp_path):
    plain = data.read_fasta(write(tmp_path / "m.fasta", MESSY))
    assert data.read_fasta(write(tmp_path / "looks_plain.fasta", gzip.compress(MESSY))) == plain


def test_write_fasta_round_trip_is_atomic(tmp_path):
    proteins = data.read_fasta(data.SHIPPED_ANTIBODIES)[:5]
    target = tmp_path / "sub" / "out.fasta"
    data.write_fasta(target, proteins)
    assert data.read_fasta(target, drop_duplicates=False) == proteins

    class Boom(Exception):
        pass

    def exploding():
        yield proteins[0]
        raise Boom

    with pytest.raises(Boom):
        data.write_fasta(target, exploding())
    assert data.read_fasta(target, drop_duplicates=False) == proteins  # old file untouched
    assert [f.name for f in target.parent.iterdir()] == ["out.fasta"]  # no temp file left


def test_shipped_samples_parse_cleanly():
    stats = {}
    assert len(data.read_fasta(data.SHIPPED_UNIPROT, stats=stats)) == 2000
    assert stats["duplicates"] == 0 and stats["rare_to_x"] == 2  # one Z, one B
    assert len(data.read_fasta(data.SHIPPED_ANTIBODIES)) == 1000


# Bad inputs: (name, file content or None for no file, words the one-line message must contain).
BAD_INPUTS = [
    ("missing", None, "no such file"),
    ("empty", b"", "file is empty"),
    ("no_records", b"\n  \n\r\n", "no FASTA records"),
    ("no_header", b"MKTAIL\n>P1\nMKT\n", "line 1: sequence data before the first '>' header"),
    ("binary", bytes(range(256)) * 4, "binary content"),
    ("corrupt_gzip", b"\x1f\x8b\x08\x00garbage-not-deflate" * 3, "corrupt or truncated gzip"),
    ("truncated_gzip", gzip.compress(data.SHIPPED_ANTIBODIES.read_bytes())[:20000], "corrupt or truncated gzip"),
    ("digits", b">P1\nMKT\n>P2\nMKT42AIL\n", "line 4: invalid character '4' in sequence P2"),
    ("punctuation", b">P1\nMKT;AIL\n", "line 2: invalid character ';'"),
    ("gap", b">P1\nMKT-AIL\n", "line 2: alignment gap '-'"),
    ("after_stop", b">P1\nMKT*\nAIL\n", "line 3: residues after the terminal '*' of P1"),
    ("no_id", b">\nMKT\n", "line 1: header '>' has no sequence id"),
]


@pytest.mark.parametrize("name,content,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_read_fasta_rejects_bad_input_in_one_line(tmp_path, name, content, expected):
    path = tmp_path / f"{name}.fasta"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        data.read_fasta(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


SUBPROCESS_CASES = ["missing", "empty", "no_records", "binary", "corrupt_gzip", "digits", "punctuation"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_download_script_rejects_bad_input_fasta(tmp_path, name):
    content = dict((b[0], b[1]) for b in BAD_INPUTS)[name]
    bad = tmp_path / f"{name}.fasta"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "split"
    result = subprocess.run(
        [sys.executable, str(REPO / "download_sample_data.py"), "--output_dir", str(out), "--input_fasta", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}")
    assert "Traceback" not in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def proteins_of(n):
    return [Protein(f"P{i}", "", "M" * (i + 1)) for i in range(n)]


def test_split_is_a_deterministic_ordered_partition():
    proteins = proteins_of(50)
    train, val, test = data.split_proteins(proteins, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (35, 5, 10)
    assert sorted(train + val + test, key=proteins.index) == proteins
    for part in (train, val, test):
        assert part == sorted(part, key=proteins.index)  # file order kept
    assert data.split_proteins(proteins, 0.1, 0.2, seed=3) == (train, val, test)
    assert data.split_proteins(proteins, 0.1, 0.2, seed=4) != (train, val, test)


def test_split_small_inputs():
    train, val, test = data.split_proteins(proteins_of(3), 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (1, 1, 1)  # a positive fraction gets >= 1
    assert data.split_proteins(proteins_of(3), 0.0, 0.0)[0] == proteins_of(3)
    with pytest.raises(UserError, match="too few"):
        data.split_proteins(proteins_of(2), 0.1, 0.1)
    with pytest.raises(UserError, match="fractions"):
        data.split_proteins(proteins_of(10), 0.6, 0.5)


def test_load_splits_from_file_and_folder(tmp_path):
    fasta = tmp_path / "all.fasta"
    data.write_fasta(fasta, proteins_of(20))
    from_file = data.load_splits(fasta, 0.1, 0.1, seed=1, min_length=2)
    assert sum(map(len, from_file.values())) == 19  # P0 ("M") is shorter than min_length
    assert [len(from_file[k]) for k in data.SPLIT_NAMES] == [15, 2, 2]

    folder = tmp_path / "split"
    for name in ("train", "val"):
        data.write_fasta(folder / f"{name}.fasta", from_file[name])
    with pytest.raises(UserError, match="missing test.fasta"):
        data.load_splits(folder)
    data.write_fasta(folder / "test.fasta", [])  # a split of fraction 0
    assert data.load_splits(folder) == {**from_file, "test": []}

    with pytest.raises(UserError, match="no such file or folder"):
        data.load_splits(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


def random_batch(tok, rows, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    seqs = ["".join(letters[i] for i in torch.randint(20, (length,), generator=g).tolist()) for _ in range(rows)]
    return tok.batch_encode(seqs)[0]


def test_mask_rates_over_200k_residues(tok):
    ids = random_batch(tok, rows=1000, length=200)  # 200,000 residues
    masked, labels = data.mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    residues = ~torch.isin(ids, torch.tensor(tok.special_ids))
    assert abs(chosen.sum().item() / residues.sum().item() - 0.15) < 0.005
    assert not (chosen & ~residues).any()  # cls/eos never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])

    n = chosen.sum().item()
    to_mask = (masked[chosen] == tok.mask_id).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    to_random = 1 - to_mask - unchanged
    # a random replacement equals the original 1 time in 20: expect 10% + 0.5% unchanged
    assert abs(to_mask - 0.80) < 0.015
    assert abs(unchanged - 0.105) < 0.015
    assert abs(to_random - 0.095) < 0.015
    assert set(masked[chosen & (masked != tok.mask_id)].tolist()) <= set(tok.residue_ids)


def test_mask_never_touches_specials_or_padding_and_masks_every_sequence(tok):
    ids, attention = tok.batch_encode(["M", "K", "AC", "MKTAILKQRQISFVKSHFSRQ"] * 250)
    masked, labels = data.mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert (chosen.sum(dim=1) >= 1).all()  # the at-least-one rule, also for length-1 sequences
    assert torch.equal(chosen[::4, 1], torch.ones(250, dtype=torch.bool))  # "M": its only residue
    assert not chosen[attention == 0].any() and not chosen[:, 0].any()
    assert (masked[ids == tok.pad_id] == tok.pad_id).all()


def test_mask_is_seeded_and_zero_prob_masks_nothing(tok):
    ids = random_batch(tok, rows=8, length=50)
    first = data.mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(7))
    again = data.mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(7))
    other = data.mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    masked, labels = data.mask_tokens(ids, tok, 0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_token_budget_batches_by_hand():
    lengths = [5, 3, 9, 3, 20, 4]
    batches = data.batch_indices(lengths, max_tokens=10, shuffle=False)
    # sorted lengths 3,3 | 4,5 | 9 | 20: adding 4 to the first batch would cost 3 * 4 = 12 > 10
    assert batches == [[1, 3], [5, 0], [2], [4]]
    assert data.padding_efficiency(batches, lengths) == pytest.approx(44 / (6 + 10 + 9 + 20))
    assert data.batch_indices([], max_tokens=10) == [] and data.padding_efficiency([], []) == 1.0


def test_batches_partition_respect_budget_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 300, (500,), generator=g).tolist() + [2500]
    batches = data.batch_indices(lengths, max_tokens=2000, seed=5, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 2000 or len(b) == 1
    assert [500] in batches  # the 2500-token sequence, over budget, gets a batch of its own
    assert data.batch_indices(lengths, max_tokens=2000, seed=5, epoch=2) == batches
    assert data.batch_indices(lengths, max_tokens=2000, seed=5, epoch=3) != batches


def test_fixed_batch_size_and_argument_checks():
    lengths = [7, 1, 5, 3, 9]
    assert data.batch_indices(lengths, batch_size=2, shuffle=False) == [[1, 3], [2, 0], [4]]
    shuffled = data.batch_indices(lengths, batch_size=2, seed=1)
    assert sorted(map(sorted, shuffled)) == [[0, 2], [1, 3], [4]]
    for kwargs in ({}, {"max_tokens": 10, "batch_size": 2}, {"batch_size": 0}):
        with pytest.raises(UserError):
            data.batch_indices(lengths, **kwargs)


def test_ties_are_broken_randomly():
    orders = {tuple(map(tuple, data.batch_indices([10] * 8, batch_size=4, seed=s))) for s in range(5)}
    assert len(orders) > 1


def test_padding_efficiency_on_shipped_uniprot():
    lengths = data.token_lengths([p.sequence for p in data.read_fasta(data.SHIPPED_UNIPROT)], 512)
    assert max(lengths) == 512 and min(lengths) == 10  # 8 residues + cls + eos
    budget = data.batch_indices(lengths, max_tokens=8192, seed=0)
    assert data.padding_efficiency(budget, lengths) >= 0.9  # measured 0.987
    pad_all_to_512 = sum(lengths) / (512 * len(lengths))
    assert 0.6 < pad_all_to_512 < 0.7  # measured 0.658


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def test_collate_pads_to_longest_and_crops(tok):
    seqs = ["MKTAYIAKQR", "MKT", "ACDEFGHIKLMNPQRSTVWY" * 3]
    batch = data.collate(seqs, tok, max_seq_len=12, mask_prob=0.15, seeds=[0, 1, 2], random_crop=False)
    assert batch["input_ids"].shape == (3, 12)
    assert batch["attention_mask"].sum(dim=1).tolist() == [12, 5, 12]
    labels = batch["labels"]
    restored = torch.where(labels != -100, labels, batch["input_ids"])
    assert tok.decode(restored[0]) == "MKTAYIAKQR"
    assert tok.decode(restored[2]) == "ACDEFGHIKL"  # evaluation keeps the N-terminal window

    short = data.collate(["MKT", "MK"], tok, max_seq_len=512, mask_prob=0.15)
    assert short["input_ids"].shape == (2, 5)  # padded to the batch's longest, not to 512


def window_of(batch, row, tok):
    labels = batch["labels"][row]
    return tok.decode(torch.where(labels != -100, labels, batch["input_ids"][row]))


def test_collate_random_crop_is_a_seeded_window(tok):
    seq = tok.decode(random_batch(tok, rows=1, length=100)[0])  # 8-mers unique: a window tells its start
    starts = []
    for seed in range(1000):
        window = window_of(data.collate([seq], tok, max_seq_len=10, mask_prob=0.15, seeds=[seed]), 0, tok)
        assert len(window) == 8 and window in seq
        starts.append(seq.index(window))
    assert min(starts) == 0 and max(starts) == 92  # all 93 windows reachable, the last one too
    assert 40 < sum(starts) / len(starts) < 52  # uniform: mean 46
    again = data.collate([seq] * 4, tok, 10, 0.15, seeds=[3, 3, 4, 4])
    for key in ("input_ids", "labels"):
        assert torch.equal(again[key][0], again[key][1]) and torch.equal(again[key][2], again[key][3])
    assert not torch.equal(again["labels"][0], again["labels"][2])


def test_a_sequence_is_cropped_and_masked_the_same_in_any_batch(tok):
    target = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    alone = data.collate([target], tok, max_seq_len=24, seeds=[11])
    others = ["ACDEFGHIKLMNPQRSTVWY" * 3, "MK", "QVQLVESGGGLVQPGG"]
    crowded = data.collate(others + [target], tok, max_seq_len=24, seeds=[5, 6, 7, 11])
    length = int(alone["attention_mask"].sum())
    for key in ("input_ids", "labels", "attention_mask"):  # row 3, its padding aside
        assert torch.equal(crowded[key][3, :length], alone[key][0])
    assert not torch.equal(data.collate([target], tok, 24, seeds=[12])["labels"], alone["labels"])


def test_per_sequence_masks_have_bert_rates(tok):
    # 1,000 sequences, each with its own generator: together they must mask like one big draw
    ids = random_batch(tok, rows=1000, length=200)
    batch = data.collate(
        [tok.decode(row) for row in ids], tok, max_seq_len=202, seeds=data.mask_seeds(42, 0, range(1000))
    )
    chosen = batch["labels"] != -100
    residues = ~torch.isin(ids, torch.tensor(tok.special_ids))
    assert abs(chosen.sum().item() / residues.sum().item() - 0.15) < 0.005
    n = chosen.sum().item()
    assert abs((batch["input_ids"][chosen] == tok.mask_id).sum().item() / n - 0.80) < 0.015
    assert abs((batch["input_ids"][chosen] == ids[chosen]).sum().item() / n - 0.105) < 0.015
    # the per-sequence streams are not copies of one another: masked counts vary like Binomial(200, 0.15)
    per_row = chosen.sum(dim=1).float()
    assert 3.5 < per_row.std().item() < 6.5  # sqrt(200 * 0.15 * 0.85) = 5.05


def test_mask_seeds_differ_by_variant_and_index_and_are_stable():
    seeds = [
        s
        for seed, variant in [(42, 0), (42, 1), (42, data.VALIDATION_VARIANT), (43, 0)]
        for s in data.mask_seeds(seed, variant, range(1000))
    ]
    assert len(set(seeds)) == 4000 and all(0 <= s < 2**63 for s in seeds)
    assert data.mask_seeds(42, 0, [7]) == [data.mask_seeds(42, 0, range(10))[7]]


def test_masked_batch_crops_training_variants_only(tok):
    seqs = ["ACDEFGHIKLMNPQRSTVWY" * 5] * 8
    val = data.masked_batch(seqs, range(8), tok, 10, 0.15, seed=1, variant=data.VALIDATION_VARIANT)
    assert {window_of(val, r, tok) for r in range(8)} == {"ACDEFGHI"}
    train = data.masked_batch(seqs, range(8), tok, 10, 0.15, seed=1, variant=0)
    assert len({window_of(train, r, tok) for r in range(8)}) > 2
    assert train["sequence_index"].tolist() == list(range(8))
