"""Self-attention relation distillation (MiniLMv2, Wang et al. 2021): the query-query, key-key and
value-value relations of one teacher layer and one student layer, and the KL between them.

A relation of projection X [B, L, D] split into A relation heads of size D / A is, per head, the
row softmax of X_a X_a^T / sqrt(D / A) over the real tokens. Teacher and student need only agree
on A (it must divide both widths), not on their widths or attention heads. The projections are
read by forward hooks: the student's fused qkv Linear of a block, and the query, key and value
Linears of an HF BERT / ESM-2 self-attention module (AntiBERTy, ProtBert, ESM-2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ProjectionCapture:
    """Forward hooks that keep the outputs of one layer's query, key and value projections from
    the latest forward pass: `qkv` is (q, k, v), each [B, L, D]. Either one fused Linear whose
    output is q, k and v side by side (the student's), or three Linears (an HF teacher's)."""

    def __init__(self, fused: nn.Module | None = None, separate: tuple[nn.Module, ...] = ()):
        self.qkv: tuple[torch.Tensor, ...] | None = None
        self._parts: dict[int, torch.Tensor] = {}
        if fused is not None:
            self._handles = [fused.register_forward_hook(self._keep_fused)]
        else:
            self._handles = [m.register_forward_hook(self._keeper(i)) for i, m in enumerate(separate)]

    def _keep_fused(self, module, inputs, output):
        self.qkv = tuple(output.chunk(3, dim=-1))

    def _keeper(self, index: int):
        def keep(module, inputs, output):
            self._parts[index] = output
            if len(self._parts) == 3:
                self.qkv, self._parts = (self._parts[0], self._parts[1], self._parts[2]), {}

        return keep

    def take(self) -> tuple[torch.Tensor, ...]:
        """The projections of the latest forward pass (and forget them)."""
        if self.qkv is None:
            raise RuntimeError("no forward pass went through the captured layer")
        qkv, self.qkv = self.qkv, None
        return qkv

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def student_capture(student: nn.Module, layer: int) -> ProjectionCapture:
    """Hooks on block `layer` (negative: from the last) of an architecture.Student."""
    blocks = student.blocks
    return ProjectionCapture(fused=blocks[_layer_index(layer, len(blocks), "student")].attn.qkv)


def teacher_capture(model: nn.Module, layer: int) -> ProjectionCapture:
    """Hooks on the query, key and value Linears of self-attention layer `layer` (negative: from
    the last) of an HF BERT-style or ESM-2 masked LM."""
    layers = [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Module) for n in QKV)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no self-attention module with query, key and value")
    chosen = layers[_layer_index(layer, len(layers), "teacher")]
    return ProjectionCapture(separate=tuple(getattr(chosen, n) for n in QKV))


QKV = ("query", "key", "value")


def _layer_index(layer: int, count: int, whose: str) -> int:
    if not -count <= layer < count:
        raise ValueError(f"--relation_layers: the {whose} has {count} layers; {layer} is not one of them")
    return layer % count


def log_relations(x: torch.Tensor, real: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(X_a X_a^T / sqrt(d)) over the real keys, per relation head: [B, heads, L, L]
    from x [B, L, D] and real [B, L] bool (pad keys get probability 0)."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"--relation_heads {heads} does not divide a hidden size of {width}")
    x = x.float().view(batch, length, heads, width // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    return scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min).log_softmax(-1)


def relation_loss(student_qkv, teacher_qkv, attention_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum over q, k and v of KL(teacher relation || student relation), each averaged over the
    relation heads and the real query positions."""
    real = attention_mask.bool()
    total = torch.zeros((), device=attention_mask.device)
    for s, t in zip(student_qkv, teacher_qkv):
        log_s, log_t = log_relations(s, real, heads), log_relations(t.detach(), real, heads)
        kl_rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, heads, L]
        total = total + kl_rows.mean(1)[real].mean()
    return total


def relation_heads_check(heads: int, width: int, what: str) -> None:
    """--relation_heads must divide the width of both sides (`what` names the one checked)."""
    if heads <= 0 or width % heads:
        raise ValueError(f"--relation_heads {heads} does not divide {what} ({width})")
