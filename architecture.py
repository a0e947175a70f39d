"""The PepEmb student: a small RoPE transformer encoder with a masked-LM head.

One self-contained file (torch and the standard library only) holding:
  - ResidueTokenizer: residue letters -> the teacher's token ids, without string joins,
  - StudentConfig / Student: the model,
  - save_student / load_student: self-describing, atomically written checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

import torch


class CheckpointError(ValueError):
    """A file that is not a usable student checkpoint (foreign, truncated, unknown format)."""


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"

# Special-token spellings of the tokenizer families we support (BERT/ProtBert/AntiBERTy, ESM).
_SPECIAL_SPELLINGS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<cls>"),
    "eos": ("[SEP]", "<eos>"),
    "mask": ("[MASK]", "<mask>"),
}


class ResidueTokenizer:
    """Maps a residue string straight to the teacher's ids: [cls] residues [eos].

    Built from the teacher's vocabulary (a list of tokens, index = id), so its ids equal the
    teacher tokenizer's: `tok(" ".join(seq))` for ProtBert/AntiBERTy, `tok(seq)` for ESM. A
    byte lookup table does the mapping, so encoding costs one tensor index per sequence.
    Letters that are not in the vocabulary become X when the vocabulary has X, else unk.
    """

    def __init__(self, vocab: Sequence[str], pad_token: str, unk_token: str, cls_token: str,
                 eos_token: str, mask_token: str):
        self.vocab = list(vocab)
        index = {token: i for i, token in enumerate(self.vocab)}
        for name, token in (("pad", pad_token), ("unk", unk_token), ("cls", cls_token),
                            ("eos", eos_token), ("mask", mask_token)):
            if token not in index:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        self.pad_token, self.unk_token, self.cls_token = pad_token, unk_token, cls_token
        self.eos_token, self.mask_token = eos_token, mask_token
        self.pad_id, self.unk_id, self.cls_id = index[pad_token], index[unk_token], index[cls_token]
        self.eos_id, self.mask_id = index[eos_token], index[mask_token]

        letters = {t: i for t, i in index.items() if len(t) == 1 and t.isalpha() and t.isupper()}
        fallback = letters.get("X", self.unk_id)
        lut = torch.full((256,), fallback, dtype=torch.long)
        for letter, i in letters.items():
            lut[ord(letter)] = i
            lut[ord(letter.lower())] = i
        self._lut = lut
        # Ids a masked position may be replaced with at random (BERT's 10%): standard residues.
        self.residue_ids = [index[a] for a in STANDARD_RESIDUES if a in index]
        self.special_ids = sorted({self.pad_id, self.unk_id, self.cls_id, self.eos_id, self.mask_id}
                                  | {i for t, i in index.items() if len(t) > 1})

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab: Sequence[str]) -> "ResidueTokenizer":
        """Recognise the special tokens of a BERT-style ([PAD]...) or ESM-style (<pad>...) vocab."""
        names = {}
        for name, spellings in _SPECIAL_SPELLINGS.items():
            found = [s for s in spellings if s in vocab]
            if not found:
                raise ValueError(f"vocabulary has no {name} token (looked for {spellings})")
            names[f"{name}_token"] = found[0]
        return cls(vocab, **names)

    @classmethod
    def from_hf(cls, hf_tokenizer) -> "ResidueTokenizer":
        """From a HuggingFace tokenizer (duck-typed: no transformers import needed here)."""
        size = len(hf_tokenizer)
        vocab_map = hf_tokenizer.get_vocab()
        vocab = [None] * size
        for token, i in vocab_map.items():
            if i < size:
                vocab[i] = token
        if any(t is None for t in vocab):
            raise ValueError("teacher tokenizer ids are not contiguous from 0")
        eos = hf_tokenizer.sep_token if hf_tokenizer.sep_token in vocab_map else hf_tokenizer.eos_token
        return cls(vocab, pad_token=hf_tokenizer.pad_token, unk_token=hf_tokenizer.unk_token,
                   cls_token=hf_tokenizer.cls_token, eos_token=eos,
                   mask_token=hf_tokenizer.mask_token)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "pad_token": self.pad_token, "unk_token": self.unk_token,
                "cls_token": self.cls_token, "eos_token": self.eos_token,
                "mask_token": self.mask_token}

    @classmethod
    def from_dict(cls, d: dict) -> "ResidueTokenizer":
        return cls(**d)

    # -- use ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_hash(self) -> str:
        """Short fingerprint of the vocabulary and specials: equal hash, interchangeable ids."""
        return hashlib.sha256(json.dumps(self.to_dict()).encode()).hexdigest()[:16]

    def encode(self, sequence: str, add_special_tokens: bool = True) -> torch.Tensor:
        """1-D LongTensor of ids: [cls] residues [eos]."""
        residues = self._lut[torch.frombuffer(bytearray(sequence.encode("ascii")), dtype=torch.uint8).long()] \
            if sequence else torch.empty(0, dtype=torch.long)
        if not add_special_tokens:
            return residues
        return torch.cat([torch.tensor([self.cls_id]), residues, torch.tensor([self.eos_id])])

    def batch_encode(self, sequences: Iterable[str], pad_to: int | None = None):
        """(input_ids [B, L], attention_mask [B, L]) padded with pad_id to the longest (or pad_to)."""
        encoded = [self.encode(s) for s in sequences]
        length = max([len(e) for e in encoded] + [pad_to or 0])
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, :len(ids)] = ids
        return input_ids, (input_ids != self.pad_id).long()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Residue string (special tokens dropped, or kept as their names)."""
        special = set(self.special_ids)
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in special))
