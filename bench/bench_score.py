"""Speed of a zero-shot mutation scan (score.py --scan, masked marginals): student vs AntiBERTy vs
the ProtBert shape, on the same shipped antibody chains, in one run.

    python bench/bench_score.py                        # 3 chains; ProtBert shape on 8 sites of the first
    python bench/bench_score.py --student checkpoints/best_model --chains 10

The student is --student, or a random one of the pipeline's offline preset (d_model 128, 4 heads,
4 layers: speed does not depend on the weights). AntiBERTy runs in fp32 as score.py loads it. A
full scan of an L-residue chain is L masked copies (each scored for its 19 substitutions), packed
under the same --max_tokens for every model. The ProtBert-shaped model (random weights, 420M) is
timed on --protbert_sites sites only, and its full-scan time extrapolated per site (said so in
the output). Writes OUTPUT (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from architecture import ResidueTokenizer, Student, StudentConfig, load_student  # noqa: E402
from pepemb import (
    data,  # noqa: E402
    variant_scores,  # noqa: E402
)
from pepemb.teacher import PROTBERT_SHAPE, PROTBERT_VOCAB, load_teacher  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", help="a student checkpoint (default: a random pipeline-preset student)")
    p.add_argument("--chains", type=int, default=3, help="shipped antibody chains scanned in full")
    p.add_argument(
        "--protbert_sites", type=int, default=8, help="sites of the first chain scored by the ProtBert shape"
    )
    p.add_argument("--max_tokens", type=int, default=8192, help="token budget per forward pass (score.py's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output", default=str(REPO / "outputs" / "bench" / "bench_score.json"), help="JSON results")
    return p


def timed_scan(forward, tokenizer, proteins, mutations, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    variant_scores.score(forward, tokenizer, proteins, mutations, "masked-marginal", max_tokens=max_tokens)
    return time.perf_counter() - start, len({(m.protein, m.substitutions[0][1]) for m in mutations})


def models(args):
    """(name, forward, tokenizer, parameters) of the student, AntiBERTy and the ProtBert shape."""
    antiberty = load_teacher("antiberty")
    if args.student:
        student = load_student(args.student).model
    else:
        torch.manual_seed(0)
        student = Student(StudentConfig.from_tokenizer(antiberty.tokenizer, d_model=128, num_heads=4, num_layers=4))
    student.eval()
    protbert_tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    shape = PROTBERT_SHAPE
    protbert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(PROTBERT_VOCAB),
            hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"],
            intermediate_size=shape["intermediate_size"],
            max_position_embeddings=40000,
            pad_token_id=0,
        )
    ).eval()

    def hf(model):
        return lambda ids, mask: {"logits": model(input_ids=ids, attention_mask=mask).logits}

    return [
        ("student", lambda ids, mask: student(ids, mask), antiberty.tokenizer, student.num_parameters()),
        ("AntiBERTy", hf(antiberty.model), antiberty.tokenizer, antiberty.num_parameters),
        ("ProtBert shape", hf(protbert), protbert_tokenizer, sum(p.numel() for p in protbert.parameters())),
    ]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    proteins = data.read_fasta(data.SHIPPED_ANTIBODIES)[: args.chains]
    full = variant_scores.scan(proteins, None)
    first_sites = f"1-{args.protbert_sites}"
    few = variant_scores.scan(proteins[:1], first_sites)
    results = {
        "chains": len(proteins),
        "residues": sum(len(p.sequence) for p in proteins),
        "variants": len(full),
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor(),
        "models": {},
    }
    with torch.inference_mode():
        for name, forward, tokenizer, parameters in models(args):
            variant_scores.score(forward, tokenizer, proteins[:1], few[:19], "masked-marginal")  # warm-up
            if name == "ProtBert shape":
                seconds, sites = timed_scan(forward, tokenizer, proteins, few, args.max_tokens)
                per_site = seconds / sites
                record = {
                    "measured_sites": sites,
                    "measured_s": seconds,
                    "scan_s": per_site * results["residues"],
                    "extrapolated": True,
                }
            else:
                seconds, sites = timed_scan(forward, tokenizer, proteins, full, args.max_tokens)
                record = {"measured_sites": sites, "measured_s": seconds, "scan_s": seconds, "extrapolated": False}
            record.update(
                parameters=parameters,
                seconds_per_chain=record["scan_s"] / len(proteins),
                variants_per_s=len(full) / record["scan_s"],
            )
            results["models"][name] = record
            print(
                f"{name}: {record['seconds_per_chain']:.2f} s per chain ({parameters / 1e6:.1f}M parameters"
                + (", extrapolated from " + str(sites) + " sites)" if record["extrapolated"] else ")"),
                flush=True,
            )
    student_s = results["models"]["student"]["scan_s"]
    for record in results["models"].values():
        record["student_speedup"] = record["scan_s"] / student_s
    print(
        f"\nfull masked-marginal scan of {len(proteins)} shipped antibody chains ({results['residues']} residues, "
        f"{len(full):,} variants), {results['threads']} threads:"
    )
    print("| model | parameters | s per chain | variants/s | student is faster by |\n|---|---:|---:|---:|---:|")
    for name, r in results["models"].items():
        note = " (extrapolated)" if r["extrapolated"] else ""
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['seconds_per_chain']:.2f}{note} | {r['variants_per_s']:,.0f} "
            f"| {r['student_speedup']:.1f}x |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
