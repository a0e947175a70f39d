"""Where a run's teacher outputs come from: the live teacher, the teacher cache, or both."""

from __future__ import annotations

import numpy as np
import torch

from architecture import mean_pooled
from pepemb import data
from pepemb.cli import UserError
from pepemb.progress import progress
from pepemb.teacher_cache import TeacherCache, TeacherTargets, data_hash, describe_teacher, run_settings


def fit_max_seq_len(args, max_positions: int) -> None:
    """Lower --max_seq_len to what the teacher's position embeddings allow."""
    if args.max_seq_len > max_positions:
        print(
            f"note: the teacher takes at most {max_positions} positions; "
            f"--max_seq_len {args.max_seq_len} lowered to {max_positions}"
        )
        args.max_seq_len = max_positions


def load_teacher_targets(
    args,
    train_seqs,
    val_seqs,
    device,
    half: bool,
    variants,
    hidden_states: bool = False,
    fill_cache: bool = True,
    embeddings: bool = False,
) -> TeacherTargets:
    """Where this run's teacher outputs come from (with the last hidden states if asked). With
    --teacher_cache holding every mask variant in `variants`, the teacher is not loaded at all;
    otherwise it is, and with a cache the variants it lacks are written there as it computes them
    (unless not `fill_cache`: then a cache that lacks any is refused). With `embeddings` the
    targets also serve the teacher's per-protein embedding of each sequence, read from the cache
    or computed once at the start (and stored in the cache)."""
    cache = None
    if args.teacher_cache:
        cache = TeacherCache(args.teacher_cache)
        if cache.teacher is not None:
            fit_max_seq_len(args, cache.teacher["max_positions"])
        fingerprint = data_hash(train_seqs, val_seqs)
        cache.check(run_settings(args, fingerprint))
        if cache.serves(variants) and (cache.has_embeddings or not embeddings):
            print(
                f"teacher: {cache.teacher['name']} not loaded: its outputs for every mask variant of this run "
                f"are in the teacher cache {args.teacher_cache}"
            )
            targets = TeacherTargets(None, cache, cache.tokenizer, cache.teacher)
            if embeddings:
                targets.use_embeddings(torch.from_numpy(np.array(cache.read_embeddings())), len(train_seqs))
            return targets
        if not fill_cache:
            missing = ", ".join(
                [
                    "val" if v == data.VALIDATION_VARIANT else f"train{v}"
                    for v in sorted(variants)
                    if not cache.is_complete(v)
                ]
                + (["embeddings (cache_teacher.py --embeddings)"] if embeddings and not cache.has_embeddings else [])
            )
            raise UserError(
                f"teacher cache {args.teacher_cache} lacks mask variants {missing}, and a run of several "
                "processes does not fill a cache: fill it first with `torchrun --nproc_per_node N "
                "cache_teacher.py` and the same data, teacher and masking flags, or train without "
                "--teacher_cache"
            )

    from pepemb.teacher import load_teacher  # transformers' models are heavy: import them only when needed

    teacher = load_teacher(
        args.teacher_model, device=device, use_8bit=args.use_8bit, half=half, trust_remote_code=args.trust_remote_code
    )
    print(
        f"teacher: {teacher.name} ({teacher.num_parameters / 1e6:.1f}M parameters, {teacher.backend}, {teacher.device})"
    )
    fit_max_seq_len(args, teacher.max_positions)
    if cache is not None:
        cache.start_filling(teacher, run_settings(args, fingerprint), train_seqs, val_seqs)
        print(f"teacher cache {args.teacher_cache}: the live teacher fills the mask variants it lacks")
    targets = TeacherTargets(
        teacher, cache, teacher.tokenizer, describe_teacher(teacher), output_hidden_states=hidden_states
    )
    if embeddings:
        if cache is not None and cache.has_embeddings:
            table = np.array(cache.read_embeddings())
        else:
            table = teacher_embeddings(teacher, [*train_seqs, *val_seqs], args.max_seq_len, args.batch_size)
            if cache is not None:
                cache.write_embeddings(table)
        targets.use_embeddings(torch.from_numpy(table), len(train_seqs))
    return targets


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
