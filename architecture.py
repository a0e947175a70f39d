"""The PepEmb student: a small RoPE transformer encoder with a masked-LM head.

One self-contained file (torch and the standard library only) holding:
  - ResidueTokenizer: residue letters -> the teacher's token ids, without string joins,
  - StudentConfig / Student: the model,
  - save_student / load_student: self-describing, atomically written checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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

    def __init__(
        self, vocab: Sequence[str], pad_token: str, unk_token: str, cls_token: str, eos_token: str, mask_token: str
    ):
        self.vocab = list(vocab)
        index = {token: i for i, token in enumerate(self.vocab)}
        for name, token in (
            ("pad", pad_token),
            ("unk", unk_token),
            ("cls", cls_token),
            ("eos", eos_token),
            ("mask", mask_token),
        ):
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
        self.special_ids = sorted(
            {self.pad_id, self.unk_id, self.cls_id, self.eos_id, self.mask_id}
            | {i for t, i in index.items() if len(t) > 1}
        )

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
        return cls(
            vocab,
            pad_token=hf_tokenizer.pad_token,
            unk_token=hf_tokenizer.unk_token,
            cls_token=hf_tokenizer.cls_token,
            eos_token=eos,
            mask_token=hf_tokenizer.mask_token,
        )

    def to_dict(self) -> dict:
        return {
            "vocab": self.vocab,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "cls_token": self.cls_token,
            "eos_token": self.eos_token,
            "mask_token": self.mask_token,
        }

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
        residues = (
            self._lut[torch.frombuffer(bytearray(sequence.encode("ascii")), dtype=torch.uint8).long()]
            if sequence
            else torch.empty(0, dtype=torch.long)
        )
        if not add_special_tokens:
            return residues
        return torch.cat([torch.tensor([self.cls_id]), residues, torch.tensor([self.eos_id])])

    def batch_encode(self, sequences: Iterable[str], pad_to: int | None = None):
        """(input_ids [B, L], attention_mask [B, L]) padded with pad_id to the longest (or pad_to)."""
        encoded = [self.encode(s) for s in sequences]
        length = max([len(e) for e in encoded] + [pad_to or 0])
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
        return input_ids, (input_ids != self.pad_id).long()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Residue string (special tokens dropped, or kept as their names)."""
        special = set(self.special_ids)
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in special))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class StudentConfig:
    """Sizes of the student plus the teacher's vocabulary, so a checkpoint needs no teacher."""

    vocab: list[str]
    pad_token_id: int
    mask_token_id: int
    cls_token_id: int
    eos_token_id: int
    d_model: int = 384
    num_heads: int = 6
    num_layers: int = 4
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.1
    # None: --dropout. On CPU, attention dropout takes SDPA off its fused kernel (about 1.5x the step).
    attention_dropout: float | None = None
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5  # torch's and ESM-2's default; BERT's 1e-12 buys nothing in fp32
    tie_embeddings: bool = True
    # With a teacher's hidden size: a linear map from the student's per-protein embedding into the
    # teacher's embedding space (distill.py --embedding_weight), saved with the student.
    teacher_hidden_size: int | None = None

    def __post_init__(self):
        self.vocab = list(self.vocab)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not self.vocab:
            raise ValueError("vocab is empty: build the config from the teacher's tokenizer")
        for name in ("d_model", "num_heads", "num_layers", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"head dimension d_model/num_heads = {self.head_dim} must be even "
                f"for rotary embeddings (they rotate pairs of dimensions)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 0 or self.layer_norm_eps <= 0:
            raise ValueError(
                f"rope_base ({self.rope_base}) and layer_norm_eps ({self.layer_norm_eps}) must be positive"
            )
        for name in ("pad_token_id", "mask_token_id", "cls_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (size {self.vocab_size})")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_tokenizer(cls, tokenizer: ResidueTokenizer, **sizes) -> "StudentConfig":
        """Config whose vocabulary and special ids are the teacher tokenizer's."""
        return cls(
            vocab=tokenizer.vocab,
            pad_token_id=tokenizer.pad_id,
            mask_token_id=tokenizer.mask_id,
            cls_token_id=tokenizer.cls_id,
            eos_token_id=tokenizer.eos_id,
            **sizes,
        )


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021; ESM-2's rotary_embedding.py).

    Rotating q and k by position-dependent angles makes q_m . k_n depend on m - n only. The
    cos/sin table is a non-persistent buffer (not in state_dict) that grows to the longest
    sequence seen, so the model runs on sequences longer than any it was trained on.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim), persistent=False)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [length, head_dim]."""
        if length > self.cos.shape[0]:
            self._grow(length)
        return self.cos[:length], self.sin[:length]

    def _grow(self, length: int) -> None:
        # Built outside inference mode: a table first made under torch.inference_mode would be an
        # inference tensor, which autograd refuses to save when the model is trained afterwards.
        with torch.inference_mode(False), torch.no_grad():
            device = self.cos.device
            inv_freq = self.base ** -(torch.arange(0, self.head_dim, 2, device=device) / self.head_dim)
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self.cos = angles.cos().to(self.cos.dtype)
            self.sin = angles.sin().to(self.sin.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, head_dim] by the angles of positions 0..L-1."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.out_dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_mask, cos, sin, need_weights=False):
        """x [B, L, D]; key_mask [B, 1, 1, L] bool, True = real token. -> (out, weights or None)."""
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            # The explicit path, for inspection; it returns the weights before attention dropout.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~key_mask, float("-inf")).softmax(dim=-1)
            y = F.dropout(weights, dropout_p, self.training) @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(batch, length, d_model)
        return self.out_dropout(self.out(y)), weights


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.GELU(),
            nn.Linear(config.d_ff, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, key_mask, cos, sin, need_weights=False):
        attended, weights = self.attn(self.attn_norm(x), key_mask, cos, sin, need_weights)
        x = x + attended
        return x + self.ffn(self.ffn_norm(x)), weights


class MaskedLMHead(nn.Module):
    """BERT / ESM-2 RobertaLMHead: dense, GELU, LayerNorm, then a decoder onto the vocabulary."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Kept apart from the decoder so the bias stays the head's own when the weight is tied.
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return self.decoder(self.norm(F.gelu(self.dense(x)))) + self.bias


class Student(nn.Module):
    """RoPE transformer encoder with a masked-LM head; predicts the teacher's tokens.

    Token embeddings (no learned positions: rotary embeddings in every attention layer carry
    position), num_layers pre-LayerNorm blocks, a final LayerNorm and a BERT-style MLM head whose
    decoder shares the embedding matrix when tie_embeddings.

    The default config (d_model 384, 6 heads, 4 layers, d_ff 1536) with ProtBert's 30-token
    vocabulary has exactly 7,258,782 parameters (tied embeddings; 11,520 of them in the
    embedding).
    """

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = MaskedLMHead(config)
        self.teacher_map = nn.Linear(config.d_model, config.teacher_hidden_size) if config.teacher_hidden_size else None
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.decoder.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_embedding: bool = False,
    ) -> dict:
        """Masked-LM logits for a padded batch.

        input_ids [B, L]; attention_mask [B, L] (1 = real token) defaults to input_ids != pad.
        inputs_embeds [B, L, D] replaces the embedding lookup (Captum); the mask must then come
        from input_ids or attention_mask.

        Returns {"logits": [B, L, V]}, plus on request "hidden_states", a tuple of num_layers + 1
        [B, L, D] tensors: the embedding output, then each block's output, where (as in ESM) the
        LAST entry is taken after the final LayerNorm; "attentions", a tuple of num_layers
        [B, H, L, L] softmax weights (computed by an explicit softmax instead of the fused kernel);
        and with output_embedding "embedding" [B, D], the per-protein embedding (mean_pooled: the
        last hidden state averaged over residues), plus "teacher_embedding" [B, teacher hidden
        size], its image under the teacher map, when the student has one.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is None:
            if input_ids is None:
                raise ValueError("with inputs_embeds alone, pass attention_mask (or input_ids)")
            attention_mask = input_ids != self.config.pad_token_id
        key_mask = attention_mask.bool()
        # A row with no real token attends to every key rather than to none (softmax of all -inf
        # is NaN); its outputs are meaningless but finite.
        key_mask = (key_mask | ~key_mask.any(dim=-1, keepdim=True))[:, None, None, :]
        cos, sin = self.rotary(inputs_embeds.shape[1])

        x = self.embed_dropout(inputs_embeds)
        hidden_states, attentions = [x], []
        for block in self.blocks:
            x, weights = block(x, key_mask, cos, sin, need_weights=output_attentions)
            hidden_states.append(x)
            attentions.append(weights)
        x = self.final_norm(x)
        hidden_states[-1] = x

        output = {"logits": self.lm_head(x)}
        if output_hidden_states:
            output["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            output["attentions"] = tuple(attentions)
        if output_embedding:
            output["embedding"] = mean_pooled(x, attention_mask)
            if self.teacher_map is not None:
                output["teacher_embedding"] = self.teacher_map(output["embedding"])
        return output

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied tensors counted once); optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed_tokens.weight.numel() if exclude_embeddings else total

    def summary(self) -> str:
        c = self.config
        return (
            f"Student: {c.num_layers} layers, d_model {c.d_model}, {c.num_heads} heads, "
            f"d_ff {c.d_ff}, vocab {c.vocab_size}, {self.num_parameters() / 1e6:.1f}M parameters"
        )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "pepemb-student"
CHECKPOINT_FORMAT_VERSION = 1


def mean_pooled(
    hidden: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of hidden states [B, L, H] over each row's residue tokens: [B, H].

    Residue tokens are the real tokens (attention_mask 1) that are not special. By default the
    special ones are the layout of ResidueTokenizer, [start] residues [end] then padding: the
    first token and the last real token of each row (embed.py's rule: residues only, every
    residue counted, unknown letters included). `special_mask` [B, L] (true/1 = exclude)
    replaces that rule. A row without residues pools to zeros.
    """
    real = attention_mask.bool()
    if special_mask is None:
        special_mask = torch.zeros_like(real)
        rows = torch.arange(real.shape[0], device=real.device)
        special_mask[:, 0] = True
        special_mask[rows, (real.sum(1) - 1).clamp(min=0)] = True  # the end token
    weights = (real & ~special_mask.bool()).to(hidden.dtype)
    total = (hidden * weights[..., None]).sum(1)
    return total / weights.sum(1, keepdim=True).clamp(min=1)


class StudentCheckpoint(NamedTuple):
    model: Student
    tokenizer: ResidueTokenizer
    metadata: dict


def _reason(err: Exception, limit: int = 300) -> str:
    """Exception type and message on one line, clipped: CheckpointError messages stay one line."""
    # Of torch's weights-only failure keep the cause, not its advice to retry unsafely.
    message = str(err).split("WeightsUnpickler error:")[-1].strip().split("\n\n")[0]
    message = " ".join(message.split())
    message = message if len(message) <= limit else message[:limit] + "..."
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def save_student(model: Student, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write directory/model.pt (config + weights + metadata) and a readable directory/config.json.

    metadata must hold JSON values only (numbers, strings, lists, dicts...), which keeps the
    checkpoint loadable with torch.load(weights_only=True). Returns the model.pt path.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key
    try:
        metadata = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = asdict(model.config)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": config,
        "state_dict": model.state_dict(),
        "metadata": metadata,
    }
    summary = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "num_parameters": model.num_parameters(),
        "config": config,
        "metadata": metadata,
    }
    model_path = directory / "model.pt"
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _write_whole(model_path, buffer.getvalue())
    _write_whole(directory / "config.json", (json.dumps(summary, indent=2) + "\n").encode())
    return model_path


def _write_whole(path: Path, content: bytes) -> None:
    """Write `content` to a hidden name beside `path`, fsync it, then rename it over `path`: a
    reader, or a run resumed after kill -9, never sees half a checkpoint."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


EXPORTED_WEIGHTS = "model.safetensors"
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file: an 8-byte header length, a JSON header, raw bytes.

    Parsed with the standard library, so this file needs no safetensors package; nothing is
    unpickled, so an exported student is as safe to load as its bytes are to read.
    """
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    body = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


# --------------------------------------------------------------------------------------------
# The native export: transformers.EsmForMaskedLM's weight names (pepemb/hf_export.py writes the folder)
# --------------------------------------------------------------------------------------------

TEACHER_MAP_WEIGHTS = "teacher_map.safetensors"  # beside a native export's model.safetensors


def _esm_names(num_layers: int) -> list[tuple[str, str]]:
    """(student name, EsmForMaskedLM name) of every weight but the fused qkv and the decoder."""
    pairs = [("embed_tokens.weight", "esm.embeddings.word_embeddings.weight"), ("lm_head.bias", "lm_head.bias")]
    for suffix in ("weight", "bias"):
        pairs += [
            (f"final_norm.{suffix}", f"esm.encoder.emb_layer_norm_after.{suffix}"),
            (f"lm_head.dense.{suffix}", f"lm_head.dense.{suffix}"),
            (f"lm_head.norm.{suffix}", f"lm_head.layer_norm.{suffix}"),
        ]
        for i in range(num_layers):
            ours, esm = f"blocks.{i}.", f"esm.encoder.layer.{i}."
            pairs += [
                (f"{ours}attn_norm.{suffix}", f"{esm}attention.LayerNorm.{suffix}"),
                (f"{ours}attn.out.{suffix}", f"{esm}attention.output.dense.{suffix}"),
                (f"{ours}ffn_norm.{suffix}", f"{esm}LayerNorm.{suffix}"),
                (f"{ours}ffn.0.{suffix}", f"{esm}intermediate.dense.{suffix}"),
                (f"{ours}ffn.2.{suffix}", f"{esm}output.dense.{suffix}"),
            ]
    return pairs


def to_esm_state_dict(model: Student) -> dict[str, torch.Tensor]:
    """The student's weights under transformers.EsmForMaskedLM's names, the fused qkv split into
    query, key and value (the same architecture: pre-LayerNorm blocks, rotate-half rotary q/k,
    erf GELU, a final LayerNorm, a RobertaLM head). The teacher map is not part of it."""
    own, layers = model.state_dict(), model.config.num_layers
    esm = {theirs: own[ours] for ours, theirs in _esm_names(layers)}
    for i in range(layers):
        for suffix in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), own[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)):
                esm[f"esm.encoder.layer.{i}.attention.self.{name}.{suffix}"] = part
    esm["lm_head.decoder.weight"] = own["lm_head.decoder.weight"]
    return esm


def from_esm_state_dict(esm: dict[str, torch.Tensor], config: StudentConfig) -> dict[str, torch.Tensor]:
    """to_esm_state_dict reversed: a student state dict (a tied decoder may be absent from esm)."""
    own = {ours: esm[theirs] for ours, theirs in _esm_names(config.num_layers)}
    for i in range(config.num_layers):
        for suffix in ("weight", "bias"):
            own[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [esm[f"esm.encoder.layer.{i}.attention.self.{name}.{suffix}"] for name in ("query", "key", "value")]
            )
    own["lm_head.decoder.weight"] = esm.get("lm_head.decoder.weight", own["embed_tokens.weight"])
    return own


def _read_native_export(path: Path) -> dict:
    """save_student's payload from a folder written by pepemb/hf_export.py (config.json with a "pepemb" entry,
    model.safetensors with EsmForMaskedLM's names, teacher_map.safetensors when there is a map)."""
    stored = json.loads((path / "config.json").read_text())["pepemb"]
    config = StudentConfig(**stored["config"])
    state = from_esm_state_dict(read_safetensors(path / EXPORTED_WEIGHTS), config)
    if config.teacher_hidden_size:
        state.update({f"teacher_map.{k}": v for k, v in read_safetensors(path / TEACHER_MAP_WEIGHTS).items()})
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": stored["format_version"],
        "config": stored["config"],
        "state_dict": state,
        "metadata": stored.get("metadata", {}),
    }


def is_native_export(path: Path) -> bool:
    """Whether `path` is a folder written by pepemb/hf_export.py (a transformers ESM model of a student)."""
    try:
        return "pepemb" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _read_payload(path: Path, map_location) -> tuple[Path, dict]:
    """(the file read, save_student's payload) from a model.pt, its folder, or an exported folder
    (config.json + model.safetensors, as written by `embed.py --export_hf`)."""
    if path.is_dir() and is_native_export(path):
        try:
            return path, _read_native_export(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: unreadable exported student (config.json + {EXPORTED_WEIGHTS}): {_reason(err)}"
            ) from err
    if path.is_dir() and not (path / "model.pt").is_file() and (path / EXPORTED_WEIGHTS).is_file():
        try:
            payload = json.loads((path / "config.json").read_text())
            payload["state_dict"] = read_safetensors(path / EXPORTED_WEIGHTS)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: unreadable exported student (config.json + {EXPORTED_WEIGHTS}): {_reason(err)}"
            ) from err
        return path, payload
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no such checkpoint (pass a folder written by save_student or the model.pt inside it)"
        )
    try:
        return file, torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(
                f"{file}: refused to load: unpickling it would call {refused.group(1)}, so it "
                f"carries Python objects beyond tensors and plain containers and could run code; "
                f"only checkpoints written by save_student load"
            ) from err
        raise CheckpointError(f"{file}: unreadable, truncated or not a torch file ({_reason(err)})") from err


def load_student(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> StudentCheckpoint:
    """Load a student, in eval mode: a folder written by save_student, the model.pt inside it, or a
    folder exported by `embed.py --export_hf` (config.json + model.safetensors).

    Only tensors and plain containers are unpickled (weights_only=True). Anything that is not a
    readable student checkpoint of a known format version raises CheckpointError naming the path.
    """
    file, payload = _read_payload(Path(path), map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{file}: not a PepEmb student checkpoint (a plain state dict or a "
            f"HuggingFace model file, perhaps); write one with save_student"
        )
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format_version {version!r} is not supported "
            f"(this code reads version {CHECKPOINT_FORMAT_VERSION})"
        )
    try:
        config = StudentConfig(**payload["config"])
        model = Student(config)
        model.load_state_dict(payload["state_dict"])
        tokenizer = ResidueTokenizer.from_vocab(config.vocab)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: damaged student checkpoint ({_reason(err)})") from err
    stored_ids = (config.pad_token_id, config.cls_token_id, config.eos_token_id, config.mask_token_id)
    if stored_ids != (tokenizer.pad_id, tokenizer.cls_id, tokenizer.eos_id, tokenizer.mask_id):
        raise CheckpointError(
            f"{file}: the stored special-token ids {stored_ids} do not match those found in the stored vocabulary"
        )
    return StudentCheckpoint(model.to(map_location).eval(), tokenizer, payload.get("metadata", {}))
