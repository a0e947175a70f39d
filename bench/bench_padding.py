"""Padding efficiency of distill.py's batching: token budget, fixed batch size, padding to the maximum.

    python bench/bench_padding.py --quick      # shipped samples, one seed per random order (seconds)
    python bench/bench_padding.py              # also ../shared's larger samples, 10 seeds

Padding efficiency = real tokens / tokens after padding (data.padding_efficiency): the share of
the student's (and teacher's) work spent on real residues. Every row batches the same sequences,
cropped to --max_seq_len tokens as training crops them:
  - padded to max_seq_len: every sequence padded to the crop length, as a fixed-shape batcher does;
  - max_tokens N: data.batch_indices(max_tokens=N), distill.py's --max_tokens (length-sorted,
    longest-in-batch x batch size <= N);
  - batch_size B, sorted: data.batch_indices(batch_size=B), distill.py's --batch_size;
  - batch_size B, random: B sequences in random order, padded to each batch's longest (a plain
    shuffled DataLoader); mean and standard deviation over seeds.
Pure arithmetic on lengths: no model runs, so the numbers do not depend on the machine.
Prints a table per data set and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pepemb import data  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
MAX_TOKENS = (2048, 4096, 8192, 16384, 32768)
BATCH_SIZES = (8, 16, 32, 64)


def random_order_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Consecutive chunks of a seeded random permutation: a shuffled DataLoader's batches."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batching_rows(lengths: list[int], max_seq_len: int, seeds: int) -> list[dict]:
    """One row per batching scheme: name, efficiency (and its sd over seeds), batches, mean batch size."""
    n = len(lengths)

    def row(scheme, batches, efficiency=None, sd=None):
        return {
            "scheme": scheme,
            "efficiency": data.padding_efficiency(batches, lengths) if efficiency is None else efficiency,
            "sd": sd,
            "batches": len(batches),
            "mean_batch_size": n / len(batches),
        }

    rows = [
        row(
            f"padded to max_seq_len {max_seq_len}", [[i] for i in range(n)], efficiency=sum(lengths) / (max_seq_len * n)
        )
    ]
    rows[0]["batches"], rows[0]["mean_batch_size"] = None, None  # any batch size: every row has max_seq_len tokens
    for max_tokens in MAX_TOKENS:
        rows.append(row(f"max_tokens {max_tokens}", data.batch_indices(lengths, max_tokens=max_tokens, seed=0)))
    for batch_size in BATCH_SIZES:
        rows.append(
            row(f"batch_size {batch_size}, length-sorted", data.batch_indices(lengths, batch_size=batch_size, seed=0))
        )
        shuffled = [
            data.padding_efficiency(random_order_batches(n, batch_size, seed), lengths) for seed in range(seeds)
        ]
        rows.append(
            row(
                f"batch_size {batch_size}, random order",
                random_order_batches(n, batch_size, 0),
                efficiency=statistics.fmean(shuffled),
                sd=statistics.stdev(shuffled) if seeds > 1 else None,
            )
        )
    return rows


def print_table(name: str, lengths: list[int], cropped: int, max_seq_len: int, rows: list[dict]) -> None:
    print(
        f"\n{name}: {len(lengths)} sequences, {sum(lengths)} tokens after cropping to {max_seq_len} "
        f"({cropped} cropped); token lengths {min(lengths)}..{max(lengths)}, median {statistics.median(lengths):.0f}"
    )
    print(f"{'batching':<38}{'efficiency':>11}{'batches':>9}{'seqs/batch':>12}")
    for r in rows:
        efficiency = f"{r['efficiency']:.3f}" + (f"±{r['sd']:.3f}" if r["sd"] is not None else "")
        batches = "" if r["batches"] is None else str(r["batches"])
        size = "" if r["mean_batch_size"] is None else f"{r['mean_batch_size']:.1f}"
        print(f"{r['scheme']:<38}{efficiency:>11}{batches:>9}{size:>12}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shipped samples only, one seed for random orders")
    p.add_argument("--max_seq_len", type=int, default=512, help="crop length in tokens (cls and eos included)")
    p.add_argument(
        "--antibody_max_seq_len",
        type=int,
        default=160,
        help="crop length for the antibody samples (the offline preset's)",
    )
    p.add_argument("--output", default=str(REPO / "outputs" / "bench" / "bench_padding.json"), help="JSON results")
    args = p.parse_args(argv)

    datasets = [
        ("shipped UniProt sample", data.SHIPPED_UNIPROT, args.max_seq_len),
        ("shipped antibody sample", data.SHIPPED_ANTIBODIES, args.antibody_max_seq_len),
    ]
    if not args.quick:
        datasets += [
            ("shared UniProt sample", SHARED_DATA / "uniprot_sample.fasta", args.max_seq_len),
            ("shared antibody sample", SHARED_DATA / "antibody_sample.fasta", args.antibody_max_seq_len),
        ]
    seeds = 1 if args.quick else 10
    results = []
    for name, path, max_seq_len in datasets:
        if not path.is_file():
            print(f"\n{name}: {path} does not exist; skipped")
            continue
        sequences = [p.sequence for p in data.read_fasta(path)]
        lengths = data.token_lengths(sequences, max_seq_len)
        cropped = sum(len(s) > max_seq_len - 2 for s in sequences)
        rows = batching_rows(lengths, max_seq_len, seeds)
        print_table(name, lengths, cropped, max_seq_len, rows)
        results.append(
            {
                "data": name,
                "path": str(path),
                "sequences": len(lengths),
                "tokens": sum(lengths),
                "cropped": cropped,
                "max_seq_len": max_seq_len,
                "random_order_seeds": seeds,
                "rows": rows,
            }
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {output}")
    return results


if __name__ == "__main__":
    main()
