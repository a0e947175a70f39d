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
"""
from __future__ import annotations

import argparse
import time

import cli
import data
import distill
from cli import UserError

FLUSH_EVERY_S = 60.0  # how much teacher work a killed fill can lose


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    distill.add_data_arguments(p)
    distill.add_teacher_arguments(p)
    distill.add_device_arguments(p)
    return p


def fill_cache(args) -> dict:
    """Fill args.teacher_cache with every mask variant; returns the cache's manifest."""
    if not args.teacher_cache:
        raise UserError("--teacher_cache DIR is required: the folder to fill")
    distill.validate_shared_args(args)
    device = distill.resolve_device(args.device)
    train_seqs, val_seqs = distill.load_sequences(args)
    variants = [data.VALIDATION_VARIANT, *range(args.mask_variants)]
    targets = distill.load_teacher_targets(args, train_seqs, val_seqs, device, variants=variants,
                                           half=(args.fp16 or args.bf16) and device.type == "cuda")
    cache = targets.cache

    todo = []  # (variant, its batches, the numbers of the batches still to compute)
    for variant in variants:
        if cache.is_complete(variant):
            continue
        validation = variant == data.VALIDATION_VARIANT
        batches = distill.MaskedBatches(val_seqs if validation else train_seqs, targets.tokenizer, args,
                                        epoch=max(variant, 0), train=not validation, mask_variant=variant)
        numbers = [i for i, indices in enumerate(batches.batches) if not cache.is_filled(variant, indices)]
        todo.append((variant, batches, numbers))

    from tqdm.auto import tqdm
    bar = tqdm(total=sum(len(numbers) for _, _, numbers in todo), desc="teacher cache", unit="batch",
               dynamic_ncols=True)
    last_flush = time.monotonic()
    try:
        for variant, batches, numbers in todo:
            bar.set_postfix(variant="val" if variant == data.VALIDATION_VARIANT else variant)
            for batch in distill.batch_loader(batches, numbers, args.num_workers):
                targets({k: v.to(device, non_blocking=True) for k, v in batch.items()}, variant)
                bar.update(1)
                if time.monotonic() - last_flush > FLUSH_EVERY_S:
                    cache.flush()
                    last_flush = time.monotonic()
    finally:  # Ctrl-C too: the next run continues from here
        bar.close()
        cache.flush()
        cache.close()
    print(f"teacher cache {args.teacher_cache}: complete ({', '.join(sorted(cache.manifest['complete']))}); "
          f"{targets.batches['live']} batches through the teacher")
    return cache.manifest


def main(argv=None):
    fill_cache(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
