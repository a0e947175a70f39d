"""Explanations a reviewer can check: Integrated Gradients whose attributions add up (the number
of steps grows per target until they do), saliency sanity checks by weight randomisation
(Adebayo et al. 2018) and a deletion test of faithfulness (AOPC).

An explainer is anything with the attributes of pepemb.explainer.Explainer: `model`, `tokenizer`,
`embeddings` (the layer attributed to), `num_layers`, `width`, `device` and
`true_residue_log_probs(input_ids, true_ids)`. Each target is a 1-based residue position that is
masked; its output is log p(true residue) there.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from torch import nn

from pepemb.fidelity import spearman
from pepemb.progress import progress as progress_bar

# Default memory bound of one Integrated Gradients pass, in layers x width x tokens: autograd
# keeps roughly 16 floats per such unit, so about 1 GB (16 ProtBert samples of 67 tokens).
ACTIVATION_BUDGET = 2**24
# Completeness: an attribution is accepted when its sum misses the output's change by at most
# this share of the sum, or by at most ABSOLUTE_TOLERANCE nats (outputs that barely move).
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 0.05, 1e-3
FIRST_STEPS, MAX_STEPS = 16, 512
DELETION_SIZES = (1, 2, 5, 10)  # residues, plus 20% of the sequence
RANDOM_DRAWS = 8
SANITY_FLAG = 0.5  # a fully randomised model whose saliency still ranks residues alike (rho >= this)


@dataclass
class Saliency:
    targets: list[int]  # 1-based residue positions that were masked and predicted
    attributions: np.ndarray  # [targets, residues]: attribution of each residue to each target
    deltas: np.ndarray  # [targets] Captum's convergence delta: attribution sum - output change
    totals: np.ndarray  # [targets] sum of the attributions over all tokens
    n_steps: np.ndarray | None = None  # [targets] integration steps each target took

    @property
    def scores(self) -> np.ndarray:
        """Per residue: its attribution to the single target, or, for several targets, the mean
        |attribution| it gives to the other targets (a masked residue itself scores exactly 0)."""
        if len(self.targets) == 1:
            return self.attributions[0]
        received = np.abs(self.attributions)
        others = np.ones_like(received, dtype=bool)
        others[np.arange(len(self.targets)), np.array(self.targets) - 1] = False
        return (received * others).sum(0) / others.sum(0)

    @property
    def ranked_positions(self) -> np.ndarray:
        """0-based residue indices that have a score (all but a single target), best first."""
        candidates = np.arange(self.attributions.shape[1])
        if len(self.targets) == 1:
            candidates = candidates[candidates != self.targets[0] - 1]
        return candidates[np.argsort(-self.scores[candidates], kind="stable")]

    @property
    def relative_deltas(self) -> np.ndarray:
        return np.abs(self.deltas) / np.maximum(np.abs(self.totals), 1e-12)

    @property
    def max_relative_delta(self) -> float:
        return float(self.relative_deltas.max())

    @property
    def converged(self) -> np.ndarray:
        """Per target: whether completeness holds to the tolerance."""
        return (self.relative_deltas <= RELATIVE_TOLERANCE) | (np.abs(self.deltas) <= ABSOLUTE_TOLERANCE)

    def subset(self, rows: list[int]) -> Saliency:
        """The targets at these rows, with their attributions, deltas, totals and steps."""
        return Saliency(
            [self.targets[i] for i in rows],
            self.attributions[rows],
            self.deltas[rows],
            self.totals[rows],
            self.n_steps[rows] if self.n_steps is not None else None,
        )

    def summary(self) -> dict:
        return {
            "n_steps": self.n_steps.tolist() if self.n_steps is not None else None,
            "deltas": self.deltas.tolist(),
            "relative_deltas": self.relative_deltas.tolist(),
            "converged": self.converged.tolist(),
            "max_abs_delta": float(np.abs(self.deltas).max()),
            "max_relative_delta": self.max_relative_delta,
            "tolerance": {"relative": RELATIVE_TOLERANCE, "absolute_nats": ABSOLUTE_TOLERANCE},
        }


def _attribute(
    explainer, true_ids: torch.Tensor, targets: list[int], n_steps: int, internal_batch_size: int | None, bar
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token attributions [targets, L], convergence deltas [targets]) at n_steps."""
    tokenizer = explainer.tokenizer
    baseline = true_ids.clone()
    baseline[0, 1:-1] = tokenizer.mask_id
    per_pass = internal_batch_size or max(
        1, ACTIVATION_BUDGET // (explainer.num_layers * explainer.width * true_ids.shape[1])
    )
    chunk = max(1, per_pass // n_steps)
    ig = LayerIntegratedGradients(explainer.true_residue_log_probs, explainer.embeddings)
    attributions, deltas = [], []
    for start in range(0, len(targets), chunk):
        positions = targets[start : start + chunk]  # token index = residue position (cls is 0)
        masked = true_ids.repeat(len(positions), 1)
        masked[torch.arange(len(positions)), positions] = tokenizer.mask_id
        attribution, delta = ig.attribute(
            masked,
            baselines=baseline.expand_as(masked),
            target=positions,
            additional_forward_args=(true_ids.expand_as(masked),),
            n_steps=n_steps,
            internal_batch_size=max(per_pass, len(positions)),
            return_convergence_delta=True,
        )
        attributions.append(attribution.sum(-1).detach().double().cpu())
        deltas.append(delta.detach().double().cpu())
        bar.update(len(positions))
    return torch.cat(attributions), torch.cat(deltas)


def integrated_gradients(
    explainer,
    sequence: str,
    targets: list[int],
    n_steps: int | None = None,
    internal_batch_size: int | None = None,
    progress: bool = True,
) -> Saliency:
    """Attribute log p(true residue | its position masked) at each target to the token embeddings.

    n_steps None: each target starts at FIRST_STEPS integration steps, doubled for the targets
    whose attributions do not yet add up to the output's change (completeness within
    RELATIVE_TOLERANCE of the sum, or ABSOLUTE_TOLERANCE nats) up to MAX_STEPS; a number fixes it.
    internal_batch_size: samples (targets x steps) per forward pass; by default as many as
    ACTIVATION_BUDGET allows. Targets share a pass when their steps fit in one.
    """
    true_ids = explainer.tokenizer.encode(sequence)[None].to(explainer.device)
    count = len(targets)
    per_token = torch.zeros(count, true_ids.shape[1], dtype=torch.float64)
    deltas = torch.zeros(count, dtype=torch.float64)
    steps = np.zeros(count, dtype=np.int64)
    todo, current = list(range(count)), n_steps or FIRST_STEPS
    with progress_bar(
        desc=f"Integrated Gradients, {explainer.name}", unit="target-pass", disable=not progress, leave=False
    ) as bar:
        while todo:
            attribution, delta = _attribute(
                explainer, true_ids, [targets[i] for i in todo], current, internal_batch_size, bar
            )
            per_token[todo], deltas[todo], steps[todo] = attribution, delta, current
            totals = attribution.sum(-1).abs().clamp(min=1e-12)
            open_ = (delta.abs() > RELATIVE_TOLERANCE * totals) & (delta.abs() > ABSOLUTE_TOLERANCE)
            todo = [i for i, still in zip(todo, open_.tolist()) if still]
            if n_steps is not None or current >= MAX_STEPS:
                break
            current = min(2 * current, MAX_STEPS)
    return Saliency(list(targets), per_token[:, 1:-1].numpy(), deltas.numpy(), per_token.sum(-1).numpy(), steps)


# --------------------------------------------------------------------------------------------
# Sanity checks: does the saliency depend on what the model learned?
# --------------------------------------------------------------------------------------------


def layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's parts from the output down, as Adebayo et al.'s cascade randomises them: the
    LM head (with the final LayerNorm), each block from the top, then the embeddings."""
    if hasattr(model, "blocks"):  # a PepEmb student
        blocks = list(model.blocks)
        return (
            [("head", [model.lm_head, model.final_norm])]
            + [(f"block {i + 1}", [blocks[i]]) for i in reversed(range(len(blocks)))]
            + [("embeddings", [model.embed_tokens])]
        )
    base = model.base_model  # a HuggingFace masked LM: BERT, ESM, ...
    head = [m for name, m in model.named_children() if m is not base]
    layers = list(base.encoder.layer)
    final_norm = getattr(base.encoder, "emb_layer_norm_after", None)  # ESM's final LayerNorm; BERT has none
    final = [final_norm] if final_norm is not None else []
    return (
        [("head", head + final)]
        + [(f"block {i + 1}", [layers[i]]) for i in reversed(range(len(layers)))]
        + [("embeddings", [base.embeddings])]
    )


def randomised(model: nn.Module, groups_from_top: int, seed: int) -> nn.Module:
    """A copy of the model with its top `groups_from_top` layer groups re-initialised (BERT's
    and ESM's scheme: weights N(0, 0.02), biases 0, LayerNorms identity); the model itself is
    untouched. A parameter shared with a group not yet randomised (a tied decoder) is kept."""
    twin = copy.deepcopy(model)
    groups = layer_groups(twin)
    kept = {id(p) for _, modules in groups[groups_from_top:] for m in modules for p in m.parameters()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, modules in groups[:groups_from_top]:
            for module in modules:
                for name, p in module.named_parameters():
                    if id(p) in kept:
                        continue
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
                    else:
                        p.fill_(
                            1.0 if isinstance(_owner(module, name), nn.LayerNorm) and name.endswith("weight") else 0.0
                        )
    return twin


def _owner(module: nn.Module, parameter_name: str) -> nn.Module:
    *path, _ = parameter_name.split(".")
    for part in path:
        module = getattr(module, part)
    return module


def with_model(explainer, model: nn.Module):
    """The explainer of another copy of its model (the embeddings layer found again in the copy)."""
    embeddings = model.embed_tokens if hasattr(model, "embed_tokens") else model.get_input_embeddings()
    return dataclasses.replace(explainer, model=model, embeddings=embeddings)


def sanity_check(
    explainer,
    sequence: str,
    targets: list[int],
    trained: Saliency,
    seed: int = 0,
    internal_batch_size: int | None = None,
) -> dict:
    """Spearman between the trained model's saliency scores and those of copies randomised from
    the top down (cascading, one more layer group each), the last of which is fully random."""
    positions = trained.ranked_positions
    groups = layer_groups(explainer.model)
    cascade = []
    for k in range(1, len(groups) + 1):
        twin = with_model(explainer, randomised(explainer.model, k, seed).requires_grad_(False))
        random_saliency = integrated_gradients(
            twin, sequence, targets, internal_batch_size=internal_batch_size, progress=False
        )
        rho = spearman(trained.scores[positions], random_saliency.scores[positions])
        cascade.append(
            {
                "randomised": [name for name, _ in groups[:k]],
                "down_to": groups[k - 1][0],
                "spearman": rho,
                "max_relative_delta": random_saliency.max_relative_delta,
            }
        )
    full = cascade[-1]["spearman"]
    return {
        "cascade": cascade,
        "fully_random_spearman": full,
        "flagged": full is not None and full >= SANITY_FLAG,
        "flag_threshold": SANITY_FLAG,
    }


# --------------------------------------------------------------------------------------------
# Faithfulness: do the top-ranked residues matter to the prediction?
# --------------------------------------------------------------------------------------------


def deletion_sizes(length: int) -> list[int]:
    """How many residues each deletion step masks: 1, 2, 5, 10 and 20% of the sequence."""
    return sorted({k for k in (*DELETION_SIZES, max(1, round(0.2 * length))) if k < length})


def nearest_residues(target: int, length: int) -> list[int]:
    """0-based residues ordered by sequence distance to the 1-based target (left first on ties)."""
    centre = target - 1
    return sorted((i for i in range(length) if i != centre), key=lambda i: (abs(i - centre), i))


@torch.no_grad()
def _log_probs(explainer, sequence: str, target: int, deleted: list[list[int]]) -> np.ndarray:
    """log p(true residue at the target) with the target and each list of residues masked."""
    true_ids = explainer.tokenizer.encode(sequence).to(explainer.device)
    inputs = true_ids.repeat(len(deleted), 1)
    inputs[:, target] = explainer.tokenizer.mask_id
    for row, residues in enumerate(deleted):
        inputs[row, [i + 1 for i in residues]] = explainer.tokenizer.mask_id
    out = []
    for start in range(0, len(inputs), 64):
        batch = inputs[start : start + 64]
        out.append(explainer.true_residue_log_probs(batch, true_ids.expand_as(batch))[:, target].double().cpu())
    return torch.cat(out).numpy()


def faithfulness(explainer, sequence: str, saliency: Saliency, seed: int = 0) -> dict:
    """Deletion curves: for each target, the drop in log p(true residue) when the k residues it
    attributes most to are masked too, against k random residues (RANDOM_DRAWS draws) and the k
    residues nearest in sequence; AOPC is the mean drop over the k (Samek et al. 2017)."""
    length, sizes = len(sequence), deletion_sizes(len(sequence))
    rng = np.random.default_rng(seed)
    drops = {"saliency": [], "random": [], "nearest": []}
    for row, target in enumerate(saliency.targets):
        others = [i for i in range(length) if i != target - 1]
        by_attribution = sorted(others, key=lambda i: -saliency.attributions[row, i])
        nearest = nearest_residues(target, length)
        draws = [rng.permutation(others).tolist() for _ in range(RANDOM_DRAWS)]
        deleted = (
            [[]]
            + [by_attribution[:k] for k in sizes]
            + [nearest[:k] for k in sizes]
            + [draw[:k] for draw in draws for k in sizes]
        )
        values = _log_probs(explainer, sequence, target, deleted)
        base, n = values[0], len(sizes)
        drops["saliency"].append(base - values[1 : 1 + n])
        drops["nearest"].append(base - values[1 + n : 1 + 2 * n])
        drops["random"].append((base - values[1 + 2 * n :]).reshape(RANDOM_DRAWS, n).mean(0))
    curves = {name: np.mean(rows, axis=0) for name, rows in drops.items()}
    return {
        "sizes": sizes,
        "curves": {name: curve.tolist() for name, curve in curves.items()},
        "aopc": {name: float(curve.mean()) for name, curve in curves.items()},
        "targets": len(saliency.targets),
        "random_draws": RANDOM_DRAWS,
    }


def describe_steps(saliency: Saliency) -> str:
    """'n_steps 16-128' or 'n_steps 50': the integration steps the targets took."""
    steps = saliency.n_steps
    if steps is None or not len(steps):
        return "n_steps ?"
    low, high = int(steps.min()), int(steps.max())
    return f"n_steps {low}" if low == high else f"n_steps {low}-{high}"


def unconverged_targets(saliency: Saliency) -> list[int]:
    return [t for t, ok in zip(saliency.targets, saliency.converged) if not ok]


def top_residues(saliency: Saliency, sequence: str, k: int) -> list[dict]:
    """The k best-scored residues, best first: 1-based position, residue letter and score."""
    scores = saliency.scores
    return [
        {"position": int(i) + 1, "residue": sequence[i], "score": float(scores[i])}
        for i in saliency.ranked_positions[:k]
    ]
