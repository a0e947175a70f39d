"""ResidueTokenizer gives exactly the teacher tokenizers' ids, on real sequences."""

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizer

from architecture import STANDARD_RESIDUES, ResidueTokenizer
from pepemb.teacher import PROTBERT_VOCAB, antiberty_folder


@pytest.fixture(scope="module")
def sequences(antibody_proteins, uniprot_proteins):
    """100 antibodies, the first 200 UniProt proteins, every one with X, and the rare letters
    (data.read_fasta turns B, Z, U, O into X, but the tokenizer must match on them too)."""
    unusual = [p.sequence for p in uniprot_proteins if set(p.sequence) - set(STANDARD_RESIDUES)]
    chosen = (
        [p.sequence for p in antibody_proteins[:100]]
        + [p.sequence for p in uniprot_proteins[:200]]
        + unusual
        + ["MKBZUOXAC", "UUOOBZ"]
    )
    assert {"X", "B", "Z", "U", "O"} <= set("".join(chosen))
    return chosen


def assert_same_ids(hf_tokenizer, sequences, spaced):
    tokenizer = ResidueTokenizer.from_hf(hf_tokenizer)
    for seq in sequences:
        expected = hf_tokenizer(" ".join(seq) if spaced else seq)["input_ids"]
        assert tokenizer.encode(seq).tolist() == expected, seq


def test_protbert_vocabulary_ids_match(protbert_teacher_dir, sequences):
    hf_tokenizer = AutoTokenizer.from_pretrained(protbert_teacher_dir)
    assert len(hf_tokenizer) == 30
    assert_same_ids(hf_tokenizer, sequences, spaced=True)


def test_esm2_vocabulary_ids_match(esm_teacher_dir, sequences):
    hf_tokenizer = AutoTokenizer.from_pretrained(esm_teacher_dir)
    assert len(hf_tokenizer) == 33
    assert_same_ids(hf_tokenizer, sequences, spaced=False)


def test_antiberty_vocabulary_ids_match(sequences):
    hf_tokenizer = AutoTokenizer.from_pretrained(antiberty_folder())
    assert len(hf_tokenizer) == 25
    # AntiBERTy has no X: both tokenizers send X (and B, Z) to [UNK].
    assert ResidueTokenizer.from_hf(hf_tokenizer).encode("AXB").tolist() == [2, 5, 1, 1, 3]
    assert_same_ids(hf_tokenizer, sequences, spaced=True)


def test_transformers5_vocab_file_trap(tmp_path, sequences):
    """Rostlab/prot_bert's tokenizer: vocab.txt, {"do_lower_case": false}, no tokenizer.json."""
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(PROTBERT_VOCAB) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 30}')

    assert len(BertTokenizer(vocab_file=str(vocab_file))) == 5  # silently just the specials
    assert len(BertTokenizer(vocab=str(vocab_file), do_lower_case=False)) == 30
    hub_layout = AutoTokenizer.from_pretrained(tmp_path)  # what loading ProtBert from the Hub does
    assert len(hub_layout) == 30
    assert_same_ids(hub_layout, sequences[:50], spaced=True)


@pytest.mark.parametrize("kind", ["protbert", "esm2"])
def test_batch_padding_matches_hf(kind, protbert_teacher_dir, esm_teacher_dir, antibody_proteins):
    folder = protbert_teacher_dir if kind == "protbert" else esm_teacher_dir
    spaced = kind == "protbert"  # ProtBert reads space-separated residues, ESM the bare string
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer = ResidueTokenizer.from_hf(hf_tokenizer)
    batch = [p.sequence for p in antibody_proteins[:8]] + ["MKV", "ACDX"]
    expected = hf_tokenizer([" ".join(s) if spaced else s for s in batch], padding=True, return_tensors="pt")
    input_ids, attention_mask = tokenizer.batch_encode(batch)
    assert torch.equal(input_ids, expected["input_ids"])
    assert torch.equal(attention_mask, expected["attention_mask"])
    assert (input_ids[-1, 6:] == tokenizer.pad_id).all() and attention_mask[-1].sum() == 6
