"""Embedding speed: the default student against a ProtBert-shaped and an ESM-2 8M-shaped model.

    python bench/bench_embed.py --quick        # ~5,000 residues: under 2 minutes on 2 CPU cores
    python bench/bench_embed.py [--shared]     # all shipped UniProt sequences (+ ../shared's)

Every model has random weights (speed does not depend on them) and embeds the same sequences,
cropped to 1022 residues, through embed.embed_sequences in the same length-sorted token-budget
batches, under torch.inference_mode with torch's default thread count. The models take turns
batch by batch, so a machine shared with other jobs slows them alike and the ratios hold.
Prints a table and writes JSON (--output).

For scale: per token, the ProtBert shape does 30 x (12 x 1024^2 + 2 x 1024 x L) multiply-adds and
the student 4 x (12 x 384^2 + 2 x 384 x L), a ratio of 52x at L = 128 tokens, 47x at 512 and 43x
at 1024: the bound on the student's speed-up where both run at the same efficiency.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, EsmConfig, EsmForMaskedLM  # noqa: E402

from architecture import ResidueTokenizer, Student, StudentConfig  # noqa: E402
from pepemb import (
    data,  # noqa: E402
    devices,  # noqa: E402
)
from pepemb.inference import Embedder, embed_sequences  # noqa: E402
from pepemb.teacher import ESM2_8M_SHAPE, ESM2_VOCAB, PROTBERT_SHAPE, PROTBERT_VOCAB  # noqa: E402

CROP = 1022  # residues: ESM's truncation length, 1024 tokens with start/end
QUICK_RESIDUES = 5000  # the ProtBert shape embeds ~100 residues/s on 2 busy cores
SHARED_UNIPROT = REPO.parent / "shared" / "data" / "uniprot_sample.fasta"


def hf_shape(shape: dict) -> dict:
    """pepemb.teacher's shape names -> the keyword arguments of BertConfig / EsmConfig."""
    return dict(
        num_hidden_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"],
    )


def build_models(device: torch.device) -> dict[str, Embedder]:
    protbert_tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    student = Student(StudentConfig.from_tokenizer(protbert_tokenizer))  # d_model 384, 6 heads, 4 layers
    protbert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(PROTBERT_VOCAB), pad_token_id=0, max_position_embeddings=40000, **hf_shape(PROTBERT_SHAPE)
        )
    )
    esm = EsmForMaskedLM(
        EsmConfig(
            vocab_size=len(ESM2_VOCAB),
            pad_token_id=ESM2_VOCAB.index("<pad>"),
            mask_token_id=ESM2_VOCAB.index("<mask>"),
            max_position_embeddings=1026,
            position_embedding_type="rotary",
            token_dropout=False,
            emb_layer_norm_before=False,
            layer_norm_eps=1e-5,
            **hf_shape(ESM2_8M_SHAPE),
        )
    )
    return {
        "student": Embedder(student.to(device).eval(), protbert_tokenizer, "student"),
        "ProtBert-shaped": Embedder(protbert.to(device).eval(), protbert_tokenizer, "ProtBert-shaped"),
        "ESM-2 8M-shaped": Embedder(esm.to(device).eval(), ResidueTokenizer.from_vocab(ESM2_VOCAB), "ESM-2 8M-shaped"),
    }


def quick_subset(proteins: list, residues: int) -> list:
    """A seeded random sample of whole proteins holding at most `residues` (cropped) residues."""
    subset, total = [], 0
    for protein in random.Random(0).sample(proteins, len(proteins)):
        n = min(len(protein.sequence), CROP)
        if total + n <= residues:
            subset.append(protein)
            total += n
    return subset


def embed_seconds(embedder: Embedder, sequences: list[str], max_tokens: int) -> float:
    """Seconds to embed the sequences (last layer, cropped to CROP residues)."""
    start = time.perf_counter()
    for _ in embed_sequences(
        embedder, sequences, [embedder.num_layers], max_tokens=max_tokens, max_length=CROP, long="truncate"
    ):
        pass
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def benchmark(models: dict[str, Embedder], sequences: list[str], max_tokens: int) -> dict:
    """Per model: parameters, shape, seconds, sequences/s and residues/s over all sequences."""
    # embed_sequences batches each list again; one batch's sequences form that same one batch.
    batches = data.batch_indices(data.token_lengths(sequences, CROP + 2), max_tokens=max_tokens, shuffle=False)
    for embedder in models.values():  # warm-up: allocator, kernels, rotary tables
        embed_seconds(embedder, [min(sequences, key=len)], max_tokens)
    seconds = dict.fromkeys(models, 0.0)
    for batch in batches:
        for name, embedder in models.items():
            seconds[name] += embed_seconds(embedder, [sequences[i] for i in batch], max_tokens)
    residues = sum(min(len(s), CROP) for s in sequences)
    return {
        name: {
            "parameters": sum(p.numel() for p in embedder.model.parameters()),
            "layers": embedder.num_layers,
            "hidden_size": embedder.hidden_size,
            "seconds": seconds[name],
            "sequences_per_s": len(sequences) / seconds[name],
            "residues_per_s": residues / seconds[name],
        }
        for name, embedder in models.items()
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a seeded random subset of at most {QUICK_RESIDUES} residues (under 2 minutes on 2 cores)",
    )
    p.add_argument("--shared", action="store_true", help=f"full mode: also embed {SHARED_UNIPROT}")
    p.add_argument("--max_tokens", type=int, default=8192, help="token budget per batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="where to run")
    p.add_argument("--output", default=str(REPO / "outputs" / "bench_embed.json"), help="JSON results")
    args = p.parse_args(argv)

    device = devices.resolve_device(args.device)
    proteins = data.read_fasta(data.SHIPPED_UNIPROT)
    if args.quick:
        proteins = quick_subset(proteins, QUICK_RESIDUES)
    elif args.shared:
        if not SHARED_UNIPROT.is_file():
            raise SystemExit(f"--shared: {SHARED_UNIPROT} does not exist")
        proteins += data.read_fasta(SHARED_UNIPROT)
    sequences = [p.sequence for p in proteins]
    residues = sum(min(len(s), CROP) for s in sequences)
    print(
        f"{len(sequences)} sequences, {residues} residues after cropping to {CROP}; device {device}, "
        f"{torch.get_num_threads()} threads, max_tokens {args.max_tokens}"
    )

    torch.manual_seed(0)
    results = benchmark(build_models(device), sequences, args.max_tokens)

    student = results["student"]["residues_per_s"]
    print(f"{'model':<18}{'params':>10}{'layers':>8}{'hidden':>8}{'seq/s':>10}{'res/s':>12}{'student x':>11}")
    for name, r in results.items():
        r["student_speedup"] = student / r["residues_per_s"]
        print(
            f"{name:<18}{r['parameters'] / 1e6:>9.1f}M{r['layers']:>8}{r['hidden_size']:>8}"
            f"{r['sequences_per_s']:>10.2f}{r['residues_per_s']:>12.0f}{r['student_speedup']:>10.1f}x"
        )
    summary = {
        "sequences": len(sequences),
        "residues": residues,
        "crop": CROP,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "quick": args.quick,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "student_vs_protbert": results["ProtBert-shaped"]["student_speedup"],
        "student_vs_esm2_8m": results["ESM-2 8M-shaped"]["student_speedup"],
        "models": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"student/ProtBert {summary['student_vs_protbert']:.1f}x, student/ESM-2 8M "
        f"{summary['student_vs_esm2_8m']:.1f}x faster (residues/s); written to {output}"
    )
    return summary


if __name__ == "__main__":
    main()
