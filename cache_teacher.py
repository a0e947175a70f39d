"""Fill a teacher cache ahead of training, so that distill.py never needs the teacher.

    python cache_teacher.py --data_path data/unref_50 --teacher_model Rostlab/prot_bert \
        --teacher_cache cache/prot_bert --mask_variants 4 --max_seq_len 512 --max_tokens 16384 \
        --device cuda --fp16
    python distill.py --data_path data/unref_50 --teacher_model Rostlab/prot_bert \
        --teacher_cache cache/prot_bert --mask_variants 4 --max_seq_len 512 ...

Runs the teacher once per (mask variant, sequence), for the K training variants and the
validation set, on exactly the masks distill.py draws with the same data, teacher and masking
flags (shared with distill.py). A killed fill continues where its last flush left it; variants
already complete are skipped. See teacher_cache.py for what is stored.

On several GPUs, `torchrun --nproc_per_node 4 cache_teacher.py ...` (same flags): each process
runs its own copy of the teacher on every 4th missing batch, and rank 0, which alone holds the
cache, gathers the logits and writes them. distill.py under torchrun reads a complete cache but
does not fill one: fill it this way first.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

from pepemb import cli, data
from pepemb.cli import UserError
from pepemb.data import MaskedBatches, Masking, batch_loader
from pepemb.devices import resolve_device
from pepemb.distributed import World, broadcast_from_main, gather_to_main, join_world, run_as_rank
from pepemb.options import (
    add_data_arguments,
    add_device_arguments,
    add_teacher_arguments,
    masking,
    teacher_source,
    training_sequences,
    validate_shared_args,
)
from pepemb.progress import progress
from pepemb.teacher_targets import load_teacher_targets

FLUSH_EVERY_S = 60.0  # how much teacher work a killed fill can lose


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_arguments(p)
    add_teacher_arguments(p)
    add_device_arguments(p)
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="also store the teacher's per-protein embedding of every training and validation sequence "
        "(one vector each), which distill.py --embedding_weight reads",
    )
    return p


def fill_cache(args) -> dict | None:
    """Fill args.teacher_cache with every mask variant, alone or as one rank of a torchrun job;
    returns the cache's manifest (None on ranks other than 0)."""
    if not args.teacher_cache:
        raise UserError("--teacher_cache DIR is required: the folder to fill")
    validate_shared_args(args)
    world, device = join_world(resolve_device(args.device), args.dist_timeout)
    return run_as_rank(world, fill, args, world, device)


def fill(args, world: World, device) -> dict | None:
    """fill_cache's work on this rank. Each rank runs its own teacher on every world.size-th of
    the batches still missing; rank 0 alone holds the cache: it gathers the logits and writes."""
    train_seqs, val_seqs = training_sequences(args)
    variants = [data.VALIDATION_VARIANT, *range(args.mask_variants)]
    half = (args.fp16 or args.bf16) and device.type == "cuda"
    source, batching = teacher_source(args), masking(args)
    todo = []  # (variant, the numbers of its batches still to compute)
    cache = teacher = None
    if world.is_main:
        targets = load_teacher_targets(
            source, batching, train_seqs, val_seqs, device, variants=variants, half=half, embeddings=args.embeddings
        )
        cache, teacher = targets.cache, targets.teacher
        batching = replace(batching, max_seq_len=targets.max_seq_len)
        for variant in variants:
            if not cache.is_complete(variant):
                indices = mask_batches(batching, variant, train_seqs, val_seqs, cache.tokenizer).batches
                todo.append((variant, [i for i, batch in enumerate(indices) if not cache.is_filled(variant, batch)]))
    todo = broadcast_from_main(todo, world)
    if not world.is_main and todo:  # the teacher alone: rank 0 holds the cache
        targets = load_teacher_targets(
            replace(source, teacher_cache=None), batching, train_seqs, val_seqs, device, variants=variants, half=half
        )
        teacher, batching = targets.teacher, replace(batching, max_seq_len=targets.max_seq_len)

    bar = progress(
        total=sum(len(numbers) for _, numbers in todo), desc="teacher cache", unit="batch", disable=not world.is_main
    )
    last_flush, computed = time.monotonic(), 0
    try:
        for variant, numbers in todo:
            bar.set_postfix(variant="val" if variant == data.VALIDATION_VARIANT else variant)
            batches = mask_batches(batching, variant, train_seqs, val_seqs, teacher.tokenizer)
            mine = iter(batch_loader(batches, numbers[world.rank :: world.size], args.num_workers))
            for _ in range(math.ceil(len(numbers) / world.size)):  # the last round: some ranks idle
                batch = next(mine, None)
                result = (
                    None
                    if batch is None
                    else (
                        batch,
                        teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device))["logits"].cpu(),
                    )
                )
                for batch, logits in gather_to_main(result, world):
                    cache.write(variant, batch, logits)
                    computed += 1
                    bar.update(1)
                if world.is_main and time.monotonic() - last_flush > FLUSH_EVERY_S:
                    cache.flush()
                    last_flush = time.monotonic()
    finally:  # Ctrl-C too: the next run continues from here
        bar.close()
        if world.is_main:
            cache.flush()
            cache.close()
    if not world.is_main:
        return None
    print(
        f"teacher cache {args.teacher_cache}: complete ({', '.join(sorted(cache.manifest['complete']))}); "
        f"{computed} batches through the teacher"
    )
    return cache.manifest


def mask_batches(batching: Masking, variant: int, train_seqs, val_seqs, tokenizer) -> MaskedBatches:
    """The batches of a mask variant, as distill.py draws them."""
    validation = variant == data.VALIDATION_VARIANT
    return MaskedBatches(
        val_seqs if validation else train_seqs,
        tokenizer,
        batching,
        epoch=max(variant, 0),
        train=not validation,
        mask_variant=variant,
    )


def main(argv=None):
    fill_cache(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
