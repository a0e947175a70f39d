"""Make a train/val/test split of protein sequences: UniRef50 from UniProt, or a local FASTA.

    python download_sample_data.py --output_dir data/unref_50_sample --num_sequences 1000
    python download_sample_data.py --output_dir data/my_split --input_fasta my_proteins.fasta
    python download_sample_data.py --output_dir data/ab_split --offline --preset antibody

Writes train.fasta, val.fasta, test.fasta and stats.json to --output_dir (plus uniref50.fasta,
the raw download). Sources:
  - UniProt REST (default): UniRef50 clusters within [--min_length, --max_length], paged until
    --num_sequences records; the first --num_sequences after filtering and de-duplication are
    kept. Transient failures (429, 5xx, timeouts, dropped connections) are retried with
    exponential backoff; if the API stays unreachable, the shipped sample is used instead.
  - --input_fasta, or --offline (the shipped sample of --preset): no network; a seeded random
    sample of --num_sequences (in file order) when the file holds more.
The same arguments and source always give the same split.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import requests

from pepemb import cli
from pepemb.data import SHIPPED_ANTIBODIES, SHIPPED_UNIPROT, SPLIT_NAMES, read_fasta, split_proteins, write_fasta
from pepemb.files import atomic_open
from pepemb.progress import progress

DEFAULT_BASE_URL = "https://rest.uniprot.org"
PRESETS = {"uniprot": SHIPPED_UNIPROT, "antibody": SHIPPED_ANTIBODIES}
REPO_ROOT = Path(__file__).resolve().parent
PAGE_SIZE = 500  # UniProt's maximum page size
MAX_PAGE_BYTES = 50 * 2**20
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0
CONNECT_TIMEOUT_S = 10.0


class ApiUnreachable(Exception):
    """The API kept failing transiently (connection, timeout, 429/5xx) through every retry."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output_dir", required=True, help="folder for train/val/test.fasta, stats.json")
    p.add_argument("--num_sequences", type=int, default=1000, help="sequences in all three splits")
    p.add_argument("--min_length", type=int, default=30, help="shortest sequence kept (residues)")
    p.add_argument("--max_length", type=int, default=1000, help="longest sequence kept (residues)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of sequences for val")
    p.add_argument("--test_fraction", type=float, default=0.1, help="share of sequences for test")
    p.add_argument("--seed", type=int, default=42, help="seeds the split and the local sample")
    p.add_argument("--input_fasta", help="split this FASTA (plain or .gz) instead of downloading")
    p.add_argument("--offline", action="store_true", help="use the shipped sample, no network")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="uniprot",
        help="shipped sample used offline or when UniProt is unreachable",
    )
    p.add_argument(
        "--base_url",
        default=os.environ.get("PEPEMB_UNIPROT_URL", DEFAULT_BASE_URL),
        help="UniProt REST root (env PEPEMB_UNIPROT_URL)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="read timeout per request, seconds")
    p.add_argument("--retries", type=int, default=3, help="retries per request on transient errors")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds; doubles on each retry")
    args = p.parse_args(argv)
    if args.num_sequences < 1:
        raise cli.UserError(f"--num_sequences must be at least 1 (got {args.num_sequences})")
    if not 1 <= args.min_length <= args.max_length:
        raise cli.UserError(f"need 1 <= --min_length <= --max_length (got {args.min_length} and {args.max_length})")
    if args.timeout <= 0 or args.retries < 0 or args.backoff < 0:
        raise cli.UserError("--timeout must be positive, --retries and --backoff non-negative")
    cli.writable_folder(args.output_dir, "--output_dir")
    return args


# --------------------------------------------------------------------------------------------
# UniProt REST
# --------------------------------------------------------------------------------------------


def download_uniref50(
    destination: Path,
    base_url: str,
    num_sequences: int,
    min_length: int,
    max_length: int,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> int:
    """Write about `num_sequences` UniRef50 records (whole pages) to `destination`, atomically.

    Follows the Link rel="next" header from page to page; returns the records written. Raises
    ApiUnreachable when a page fails transiently through all retries, UserError when the
    server answers with a client error or with something that is not FASTA.
    """
    url = f"{base_url.rstrip('/')}/uniref/search"
    params = {
        "query": f"(identity:0.5) AND (length:[{min_length} TO {max_length}])",
        "format": "fasta",
        "size": min(PAGE_SIZE, num_sequences),
    }
    written = 0
    with (
        requests.Session() as session,
        atomic_open(destination, "w") as out,
        progress(total=num_sequences, unit="seq", desc="UniRef50") as bar,
    ):
        session.headers["User-Agent"] = "pepemb-distill download_sample_data.py"
        while url and written < num_sequences:
            text, url = fetch_page(session, url, params, timeout, retries, backoff)
            params = None  # the next-page link carries the query
            out.write(text if text.endswith("\n") or not text else text + "\n")
            records = text.count("\n>") + text.startswith(">")
            written += records
            bar.update(min(records, num_sequences - bar.n))
        if not written:
            raise cli.UserError(
                f"{base_url} has no UniRef50 clusters of {min_length}-{max_length} "
                "residues; adjust --min_length / --max_length"
            )
    return written


def fetch_page(
    session: requests.Session, url: str, params: dict | None, timeout: float, retries: int, backoff: float
) -> tuple[str, str | None]:
    """(FASTA text, next page url or None) of one page, retrying transient failures."""
    for attempt in range(retries + 1):
        delay = backoff * 2**attempt
        try:
            response = session.get(url, params=params, timeout=(CONNECT_TIMEOUT_S, timeout), stream=True)
            with response:
                if response.status_code in RETRY_STATUS:
                    failure = f"HTTP {response.status_code}"
                    delay = _retry_after(response, delay)
                else:
                    if response.status_code >= 400:
                        raise cli.UserError(
                            f"{response.url} answered HTTP {response.status_code} {response.reason}; check --base_url"
                        )
                    text = _read_fasta_body(response)
                    return text, response.links.get("next", {}).get("url")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            failure = type(err).__name__
        if attempt < retries:
            time.sleep(delay)
    raise ApiUnreachable(f"{failure} after {retries + 1} attempts")


def _retry_after(response: requests.Response, default: float) -> float:
    try:
        return min(float(response.headers["Retry-After"]), MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):  # absent, or an HTTP date: fall back to our own backoff
        return default


def _read_fasta_body(response: requests.Response) -> str:
    """The body as text, refusing pages over MAX_PAGE_BYTES and anything that is not FASTA."""
    declared = int(response.headers.get("Content-Length") or 0)
    body = bytearray()
    if declared <= MAX_PAGE_BYTES:
        for chunk in response.iter_content(chunk_size=1 << 16):
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                break
    if declared > MAX_PAGE_BYTES or len(body) > MAX_PAGE_BYTES:
        raise cli.UserError(f"{response.url} sent a page over {MAX_PAGE_BYTES:,} bytes; refusing it (check --base_url)")
    text = body.decode("utf-8", errors="replace")
    if text.strip() and not text.lstrip().startswith(">"):
        raise cli.UserError(
            f"{response.url} did not answer with FASTA (starts with {text.lstrip()[:40]!r}); check --base_url"
        )
    return text


# --------------------------------------------------------------------------------------------
# Selection, split, output
# --------------------------------------------------------------------------------------------


def select_proteins(path: Path, args: argparse.Namespace, sample: bool):
    """(proteins, read stats): length-filtered, de-duplicated, at most --num_sequences.

    With `sample`, a seeded random sample (kept in file order); otherwise the first ones.
    """
    stats = {}
    proteins = read_fasta(path, min_length=args.min_length, stats=stats)
    kept = [p for p in proteins if len(p.sequence) <= args.max_length]
    stats["too_long"] = len(proteins) - len(kept)
    if len(kept) > args.num_sequences:
        if sample:
            chosen = random.Random(args.seed).sample(range(len(kept)), args.num_sequences)
            kept = [kept[i] for i in sorted(chosen)]
        else:
            kept = kept[: args.num_sequences]
    if not kept:
        raise cli.UserError(
            f"{path}: no sequences of {args.min_length}-{args.max_length} residues; adjust --min_length / --max_length"
        )
    stats["selected"] = len(kept)
    return kept, stats


def length_summary(proteins) -> dict:
    lengths = [len(p.sequence) for p in proteins]
    if not lengths:
        return {"count": 0, "length_min": None, "length_median": None, "length_max": None}
    return {
        "count": len(lengths),
        "length_min": min(lengths),
        "length_median": statistics.median(lengths),
        "length_max": max(lengths),
    }


def write_splits(output_dir: Path, splits: dict, info: dict) -> None:
    """train/val/test.fasta and stats.json (info plus per-split counts and lengths)."""
    for name, proteins in splits.items():
        write_fasta(output_dir / f"{name}.fasta", proteins)
    info = {**info, "splits": {name: length_summary(p) for name, p in splits.items()}}
    with atomic_open(output_dir / "stats.json", "w") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")


def obtain_source(args: argparse.Namespace) -> tuple[Path, str, bool]:
    """(FASTA path, source for stats.json, whether it is a fresh UniProt download)."""
    if args.input_fasta or args.offline:
        if args.input_fasta:
            return Path(args.input_fasta), args.input_fasta, False
        path = PRESETS[args.preset]
        return path, str(path.relative_to(REPO_ROOT)), False
    path = Path(args.output_dir) / "uniref50.fasta"
    try:
        download_uniref50(
            path,
            args.base_url,
            args.num_sequences,
            args.min_length,
            args.max_length,
            args.timeout,
            args.retries,
            args.backoff,
        )
    except ApiUnreachable as err:
        path = PRESETS[args.preset]
        shipped = str(path.relative_to(REPO_ROOT))
        print(
            f"warning: UniProt API at {args.base_url} is unreachable ({err}); "
            f"using the shipped sample {shipped} instead",
            file=sys.stderr,
        )
        return path, shipped, False
    return path, args.base_url, True


def main(argv=None) -> None:
    args = parse_args(argv)
    path, source, downloaded = obtain_source(args)
    proteins, read_stats = select_proteins(path, args, sample=not downloaded)
    splits = dict(zip(SPLIT_NAMES, split_proteins(proteins, args.val_fraction, args.test_fraction, args.seed)))
    info = {
        "source": source,
        "seed": args.seed,
        "num_sequences": args.num_sequences,
        "min_length": args.min_length,
        "max_length": args.max_length,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "read_stats": read_stats,
    }
    write_splits(Path(args.output_dir), splits, info)
    counts = ", ".join(f"{name} {len(p)}" for name, p in splits.items())
    print(f"wrote {args.output_dir}: {counts} sequences from {source}")


if __name__ == "__main__":
    cli.run(main)
