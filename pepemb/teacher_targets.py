"""Where a run's teacher outputs come from: the live teacher, the teacher cache, or both."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from architecture import ResidueTokenizer, mean_pooled
from pepemb import data
from pepemb.cli import UserError
from pepemb.data import Masking
from pepemb.progress import progress
from pepemb.relations import teacher_capture
from pepemb.teacher_cache import TeacherCache, data_hash, describe_teacher, run_settings


@dataclass(frozen=True)
class TeacherSource:
    """The teacher of a run and how it is loaded (Hub id, folder or 'antiberty'; int8; the
    model's own code allowed), and the teacher cache folder that may stand in for it, with the
    cache's number of mask variants and stored positions (distill.py's flags of these names)."""

    teacher_model: str
    use_8bit: bool = False
    trust_remote_code: bool = False
    teacher_cache: str | None = None
    mask_variants: int = 4
    distill_positions: str = "masked"

    def cache_settings(self, masking: Masking, fingerprint: str) -> dict:
        """The settings a cache must hold to serve this source with this masking and data."""
        return run_settings(self.teacher_model, masking, self.mask_variants, self.distill_positions, fingerprint)


class TeacherTargets:
    """The teacher's outputs for a batch, live or cached: the one place where training gets them.

    A mask variant complete in the cache is read from it. Any other batch goes through the live
    teacher; with a cache its logits are also written there and come back rounded to fp16, as a
    later reader sees them, so a run trains on the same targets whether the cache was filled by
    itself, by an earlier run or by cache_teacher.py. `about` describes the teacher (loaded or
    not), `batches` counts the batches served live and from the cache, `max_seq_len` is the crop
    the targets were loaded for (load_teacher_targets lowers it to what the teacher takes).
    """

    def __init__(
        self,
        teacher,
        cache: TeacherCache | None,
        tokenizer: ResidueTokenizer,
        about: dict,
        output_hidden_states: bool = False,
        max_seq_len: int | None = None,
        relation_layer: int | None = None,
    ):
        self.teacher, self.cache, self.tokenizer, self.about = teacher, cache, tokenizer, about
        # --relation_weight: the live teacher's q, k, v of one layer, served as "relations"
        self.relations = None
        if relation_layer is not None:
            try:
                self.relations = teacher_capture(teacher.model, relation_layer)
            except ValueError as err:
                raise UserError(str(err)) from None
        self.output_hidden_states, self.max_seq_len = output_hidden_states, max_seq_len
        self.batches = {"live": 0, "cached": 0}
        self.embeddings: torch.Tensor | None = None  # [train + val, hidden], when the loss needs them
        self.train_sequences = 0

    def use_embeddings(self, embeddings: torch.Tensor, train_sequences: int) -> None:
        """Serve each batch's rows of the teacher's per-protein embeddings (training sequences
        first, then validation ones) as "embeddings", with "embedding_scale", the mean variance per
        dimension over the training sequences (the scale of the embedding loss)."""
        self.embeddings, self.train_sequences = embeddings, train_sequences
        self.embedding_scale = float(embeddings[:train_sequences].var(0).mean())

    def add_embeddings(self, out: dict, batch: dict, variant: int) -> dict:
        if self.embeddings is not None:
            offset = self.train_sequences if variant == data.VALIDATION_VARIANT else 0
            rows = batch["sequence_index"].cpu() + offset
            out["embeddings"] = self.embeddings[rows].to(batch["input_ids"].device)
            out["embedding_scale"] = self.embedding_scale
        return out

    def flush(self) -> None:
        """Make the cache entries written so far durable (TeacherCache.flush), if there is a cache."""
        if self.cache is not None:
            self.cache.flush()

    def close(self) -> None:
        """Close the cache, if there is one, and give up its fill lock (TeacherCache.close)."""
        if self.cache is not None:
            self.cache.close()

    def __call__(self, batch: dict, variant: int) -> dict:
        """{"logits": [B, L, V] float32} (+ "hidden_states", "relations" when asked) for a batch
        of this mask variant."""
        if self.cache is not None and self.cache.is_complete(variant):
            self.batches["cached"] += 1
            return self.add_embeddings({"logits": self.cache.read(variant, batch)}, batch, variant)
        if self.teacher is None:
            raise RuntimeError(f"mask variant {variant} is not in the teacher cache and no teacher is loaded")
        self.batches["live"] += 1
        out = self.teacher(batch["input_ids"], batch["attention_mask"], output_hidden_states=self.output_hidden_states)
        if self.cache is not None:
            out["logits"] = self.cache.write(variant, batch, out["logits"])
        if self.relations is not None:  # copies outside inference mode, as Teacher's outputs
            out["relations"] = tuple(x.to(torch.float32, copy=True) for x in self.relations.take())
        return self.add_embeddings(out, batch, variant)


def fit_max_seq_len(max_seq_len: int, max_positions: int) -> int:
    """--max_seq_len, lowered (with a note) to what the teacher's position embeddings allow."""
    if max_seq_len > max_positions:
        print(
            f"note: the teacher takes at most {max_positions} positions; "
            f"--max_seq_len {max_seq_len} lowered to {max_positions}"
        )
        return max_positions
    return max_seq_len


def load_teacher_targets(
    source: TeacherSource,
    masking: Masking,
    train_seqs,
    val_seqs,
    device,
    half: bool,
    variants,
    hidden_states: bool = False,
    fill_cache: bool = True,
    embeddings: bool = False,
    relation_layer: int | None = None,
) -> TeacherTargets:
    """Where this run's teacher outputs come from (with the last hidden states if asked). With
    the source's cache holding every mask variant in `variants`, the teacher is not loaded at all;
    otherwise it is, and with a cache the variants it lacks are written there as it computes them
    (unless not `fill_cache`: then a cache that lacks any is refused). With `embeddings` the
    targets also serve the teacher's per-protein embedding of each sequence, read from the cache
    or computed once at the start (and stored in the cache); with `relation_layer`, the live
    teacher's q, k and v of that layer (relations.teacher_capture). The targets' max_seq_len is
    masking.max_seq_len lowered to what the teacher takes: the crop the run must use."""
    cache = None
    if source.teacher_cache:
        cache = TeacherCache(source.teacher_cache)
        if cache.teacher is not None:
            masking = replace(masking, max_seq_len=fit_max_seq_len(masking.max_seq_len, cache.teacher["max_positions"]))
        fingerprint = data_hash(train_seqs, val_seqs)
        cache.check(source.cache_settings(masking, fingerprint))
        if cache.serves(variants) and (cache.has_embeddings or not embeddings) and relation_layer is None:
            print(
                f"teacher: {cache.teacher['name']} not loaded: its outputs for every mask variant of this run "
                f"are in the teacher cache {source.teacher_cache}"
            )
            targets = TeacherTargets(None, cache, cache.tokenizer, cache.teacher, max_seq_len=masking.max_seq_len)
            if embeddings:
                targets.use_embeddings(torch.from_numpy(np.array(cache.read_embeddings())), len(train_seqs))
            return targets
        if not fill_cache:
            refuse_unfilled(cache, source.teacher_cache, variants, embeddings)

    from pepemb.teacher import load_teacher  # transformers' models are heavy: import them only when needed

    teacher = load_teacher(
        source.teacher_model,
        device=device,
        use_8bit=source.use_8bit,
        half=half,
        trust_remote_code=source.trust_remote_code,
    )
    print(
        f"teacher: {teacher.name} ({teacher.num_parameters / 1e6:.1f}M parameters, {teacher.backend}, {teacher.device})"
    )
    masking = replace(masking, max_seq_len=fit_max_seq_len(masking.max_seq_len, teacher.max_positions))
    if cache is not None:
        cache.start_filling(teacher, source.cache_settings(masking, fingerprint), train_seqs, val_seqs)
        print(f"teacher cache {source.teacher_cache}: the live teacher fills the mask variants it lacks")
    targets = TeacherTargets(
        teacher,
        cache,
        teacher.tokenizer,
        describe_teacher(teacher),
        output_hidden_states=hidden_states,
        max_seq_len=masking.max_seq_len,
        relation_layer=relation_layer,
    )
    if embeddings:
        if cache is not None and cache.has_embeddings:
            table = np.array(cache.read_embeddings())
        else:
            table = teacher_embeddings(teacher, [*train_seqs, *val_seqs], masking.max_seq_len, masking.batch_size)
            if cache is not None:
                cache.write_embeddings(table)
        targets.use_embeddings(torch.from_numpy(table), len(train_seqs))
    return targets


def refuse_unfilled(cache: TeacherCache, folder: str, variants, embeddings: bool) -> None:
    """The error of a run of several processes (which do not fill a cache) on the cache in
    `folder` (--teacher_cache) that lacks some of its mask variants (or the embeddings it needs)."""
    missing = ", ".join(
        ["val" if v == data.VALIDATION_VARIANT else f"train{v}" for v in sorted(variants) if not cache.is_complete(v)]
        + (["embeddings (cache_teacher.py --embeddings)"] if embeddings and not cache.has_embeddings else [])
    )
    raise UserError(
        f"teacher cache {folder} lacks mask variants {missing}, and a run of several "
        "processes does not fill a cache: fill it first with `torchrun --nproc_per_node N "
        "cache_teacher.py` and the same data, teacher and masking flags, or train without "
        "--teacher_cache"
    )


def teacher_embeddings(teacher, sequences: list[str], max_seq_len: int, batch_size: int) -> np.ndarray:
    """The teacher's per-protein embedding of each sequence: its last hidden state averaged over
    the residues (architecture.mean_pooled) of the unmasked sequence, cropped as evaluation crops it
    (the first max_seq_len - 2 residues). float32 [sequences, hidden]."""
    rows = []
    for start in progress(range(0, len(sequences), batch_size), desc="teacher embeddings", unit="batch"):
        batch = data.unmasked_batch(sequences[start : start + batch_size], teacher.tokenizer, max_seq_len)
        hidden = teacher(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)["hidden_states"]
        rows.append(mean_pooled(hidden, batch["attention_mask"].to(hidden.device)).cpu())
    return torch.cat(rows).numpy().astype(np.float32)
