"""Is distillation worth it? Students trained for equal wall-clock budgets, with and without the teacher.

    python bench/fidelity.py --quick            # mlm vs kd-cache, 1 minute each, tiny student
    python bench/fidelity.py --variants mlm-cache,kd-cache --budgets 10,30 \
        --fasta ../shared/data/antibody_sample.fasta      # the main comparison, on the full antibody set
    python bench/fidelity.py --variants kd,kd-cache-t1 --budgets 800steps --jobs 2
                                                # quality per step, two runs at a time
    python bench/fidelity.py                    # every variant at 10 and 30 minutes
    python bench/fidelity.py --variants mlm,kd-cache --budgets 1200steps --train_sizes 500,2000,all \
        --repeats 2 --jobs 2 --mask_variants 8 --d_model 128      # the regime map (fidelity_regimes.png)

Teacher: AntiBERTy, int8 on CPU (`--use_8bit`). Data: the antibody chains of --fasta, by default
the 1,000 shipped in data/antibody_sample.fasta; `--fasta ../shared/data/antibody_sample.fasta`
is the full set where ../shared is present. They are split once: a tenth each for test and
validation, at most 1,000 test and 500 validation chains; fidelity.json and fidelity.md say which
file and how many chains. Every run is one `distill.py --max_time MINUTES` subprocess, run one
after another so that each has the CPUs to itself, with the same student, data order,
initialisation and learning rate; only the loss and where the teacher's outputs come from differ
(fidelity_variants.py). Each final checkpoint is then scored on the test split, which no run
trains or validates on, with fixed masks and evaluate.py's statistics (fidelity_scoring.py).

`--train_sizes 500,2000,all` trains every variant on the first N chains of a fixed shuffled
training list (a smaller set is part of every larger one; validation and test stay the same), each
size with its own teacher cache; fidelity_regimes.png plots every measure against N, and against
the wall-clock budget when there are several.

Teacher time is counted where it is spent. The live variants pay a teacher forward pass per
training step inside their budget. `kd-cache` reads logits that cache_teacher.py wrote before
the run: that fill is timed separately and reported next to the run (it is paid once per data
set and masking, for every student distilled after). `kd-cache-fill` starts from an empty cache
and fills it while training, inside its budget. The masked-LM-only run never calls the teacher
in training, but distill.py still loads it and computes its validation logits once, inside the
budget (the step-0 evaluation); `mlm-cache` reads those from the prefilled cache instead, so that
its evaluations cost exactly what kd-cache's do and only the loss differs. Masked-LM runs draw
fresh masks every epoch; the cached KD runs see the cache's --mask_variants (default 1) again in
later epochs, as a cache must.

Budgets are wall-clock minutes (`--budgets 10,30`) or optimizer steps (`--budgets 800steps`).
Masked LM and the cached KD variants do the same work per step, so among them a step budget is
an equal-compute budget; it also measures the quality per step of any variant, live teacher
included. Unlike minutes, steps are not changed by other jobs, so step-budget runs may share the
machine: `--jobs 2` runs two at a time, one CPU thread each.

Wall-clock budgets are only as fair as the machine is quiet: each run records the optimizer steps
it reached, its tokens/s, the CPU time of its process and the load average before and after it,
and the plot shows accuracy by step too, which other jobs cannot distort.

Writes OUTPUT_DIR/fidelity.json (the setup, cache fills and every run: command, steps, times,
teacher batches, validation curve, test metrics), fidelity.md (the table), fidelity.png
(validation masked accuracy and agreement against training minutes, accuracy against steps,
test accuracy marked at the end of each run) and fidelity_regimes.png (fidelity_report.py).
Runs already in fidelity.json are kept and skipped (--rerun runs them again), so budgets and
variants can be added by later invocations. This file is the command line and the order of
work; fidelity_runs.py launches the runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from fidelity_report import data_line, load_results, results_table, save_results
from fidelity_runs import TEST_SEQUENCES, VAL_SEQUENCES, prefilled_cache, prepare_data, trained
from fidelity_scoring import MUTATION_POSITIONS, TestSet, score
from fidelity_variants import VARIANTS, Budget, run_key
from pepemb import cli, data, heldout
from pepemb.cli import UserError
from student_runs import MAX_SEQ_LEN, SEED

QUICK = {
    "variants": "mlm,kd-cache",
    "budgets": "1",
    "d_model": 64,
    "num_heads": 4,
    "num_layers": 2,
    "eval_every": 25,
    "output_dir": "outputs/fidelity_quick",
    "mutation_proteins": 20,
    "embedding_proteins": 100,
}
FULL = {
    "variants": ",".join(VARIANTS),
    "budgets": "10,30",
    "d_model": 256,
    "num_heads": 4,
    "num_layers": 4,
    "eval_every": 50,
    "output_dir": "outputs/fidelity",
    "mutation_proteins": heldout.MUTATION_PROTEINS,
    "embedding_proteins": heldout.EMBEDDING_PROTEINS,
}


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--fasta and --train_sizes: the chains every run splits the same way, and how many train."""
    p.add_argument(
        "--fasta",
        type=Path,
        default=data.SHIPPED_ANTIBODIES,
        metavar="PATH",
        help="antibody chains (a relative path is from the repository: ../shared/data/antibody_sample.fasta "
        f"is the full set), split once: a tenth each for test and validation, at most {TEST_SEQUENCES:,} test "
        f"and {VAL_SEQUENCES} validation chains [{data.SHIPPED_ANTIBODIES.relative_to(REPO)}]",
    )
    p.add_argument(
        "--train_sizes",
        default="all",
        help="comma-separated training-set sizes: the first N chains of a fixed shuffled training list "
        "(same validation and test chains), or 'all' [all]",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="variants:\n" + "\n".join(f"  {v.name:<15}{v.about}" for v in VARIANTS.values()),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run on the shipped 1,000 chains: {QUICK['variants']} at {QUICK['budgets']} minute, "
        f"d_model {QUICK['d_model']}, {QUICK['num_layers']} layers",
    )
    p.add_argument("--variants", help=f"comma-separated, from the list below [{FULL['variants']}]")
    p.add_argument(
        "--budgets",
        help="comma-separated training budgets: wall-clock minutes (10), or optimizer steps "
        f"(800steps) for step-matched runs [{FULL['budgets']}]",
    )
    add_data_arguments(p)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each variant and budget; a wall-clock run repeated differs by the learning rates "
        "its timing gave (the schedule follows the clock), which measures run-to-run noise",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, with the CPU threads shared out; step budgets only (a wall-clock budget "
        "needs the machine to itself)",
    )
    p.add_argument("--output_dir", help=f"where everything goes [{FULL['output_dir']}; --quick {QUICK['output_dir']}]")
    p.add_argument("--d_model", type=int, help=f"student width [{FULL['d_model']}]")
    p.add_argument("--num_heads", type=int, help=f"student attention heads [{FULL['num_heads']}]")
    p.add_argument("--num_layers", type=int, help=f"student blocks [{FULL['num_layers']}]")
    p.add_argument("--eval_every", type=int, help=f"validation every N steps [{FULL['eval_every']}]")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--warmup_steps", type=int, default=20, help="linear warmup; a 10-minute CPU budget is a few hundred steps"
    )
    p.add_argument(
        "--mask_variants",
        type=int,
        default=1,
        help="mask variants a teacher cache holds; 1 covers a budget of under one epoch "
        "(later epochs then repeat the masks), each more costs one more teacher pass over the data",
    )
    p.add_argument(
        "--mutation_proteins",
        type=int,
        help=f"test chains scored for mutation effects, {MUTATION_POSITIONS} sites each, as evaluate.py "
        f"[{FULL['mutation_proteins']}; --quick {QUICK['mutation_proteins']}]",
    )
    p.add_argument(
        "--embedding_proteins",
        type=int,
        help=f"test chains for CKA and 10-NN overlap, as evaluate.py [{FULL['embedding_proteins']}; "
        f"--quick {QUICK['embedding_proteins']}]",
    )
    p.add_argument(
        "--score_steps",
        default="",
        help="comma-separated steps (1200,2400): also keep and score on the test split each run's checkpoint "
        "at these steps, for a training-length curve (fidelity.json: 'along')",
    )
    p.add_argument("--max_steps", type=int, default=None, help="also cap every run at this many steps (for testing)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where students and teacher run")
    p.add_argument("--rerun", action="store_true", help="run again the variants and budgets already in fidelity.json")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill the defaults that --quick changes; parse and check the lists."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise UserError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
        )
    try:
        args.budgets = [Budget.parse(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise UserError(
            f"--budgets {args.budgets!r}: give positive minutes or step counts separated by commas, "
            "e.g. 10,30 or 800steps"
        ) from None
    if not args.budgets:
        raise UserError("--budgets: give at least one budget")
    try:
        args.train_sizes = [None if s.strip() == "all" else int(s) for s in args.train_sizes.split(",") if s.strip()]
    except ValueError:
        raise UserError(
            f"--train_sizes {args.train_sizes!r}: give chain counts or 'all' separated by commas, e.g. 500,2000,all"
        ) from None
    try:
        args.score_steps = sorted({int(s) for s in args.score_steps.split(",") if s.strip()})
    except ValueError:
        raise UserError(
            f"--score_steps {args.score_steps!r}: give step counts separated by commas, e.g. 1200,2400"
        ) from None
    if any(s <= 0 for s in args.score_steps):
        raise UserError("--score_steps: steps must be positive")
    if not args.train_sizes or any(n is not None and n < args.batch_size for n in args.train_sizes):
        raise UserError(f"--train_sizes: give sizes of at least --batch_size ({args.batch_size}) chains, or 'all'")
    if args.jobs > 1 and any(b.minutes is not None for b in args.budgets):
        raise UserError("--jobs: runs with wall-clock budgets must run one at a time; use step budgets (800steps)")
    for name in (
        "d_model",
        "num_heads",
        "num_layers",
        "eval_every",
        "batch_size",
        "mask_variants",
        "jobs",
        "repeats",
        "mutation_proteins",
        "embedding_proteins",
    ):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    args.output_dir = cli.writable_folder(REPO / args.output_dir, "--output_dir")
    args.fasta = (REPO / args.fasta).resolve()
    return args


def scoring_setup(args, data_dir: Path, results: dict) -> TestSet:
    """The teacher's side of the test scores, computed once, recorded in the setup."""
    print(f"scoring set-up: the teacher on the {results['setup']['data']['test']:,} test chains, once", flush=True)
    test_set = TestSet(
        data_dir / "test.fasta",
        device=args.device,
        batch_size=args.batch_size,
        mutation_proteins=args.mutation_proteins,
        embedding_proteins=args.embedding_proteins,
    )
    results["setup"]["teacher_backend"] = test_set.teacher_backend
    results["setup"]["baseline_mutations"] = test_set.baseline_mutations
    return test_set


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    output_dir = args.output_dir
    data_dir = output_dir / "data"
    setup = {
        "data": prepare_data(data_dir, args.fasta, args.quick),
        "student": {k: getattr(args, k) for k in ("d_model", "num_heads", "num_layers")},
        **{
            k: getattr(args, k)
            for k in (
                "batch_size",
                "learning_rate",
                "warmup_steps",
                "eval_every",
                "max_steps",
                "device",
                "mutation_proteins",
                "embedding_proteins",
            )
        },
        "max_seq_len": MAX_SEQ_LEN,
        "seed": SEED,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"data: {data_line(setup['data'])}", flush=True)
    results = load_results(output_dir / "fidelity.json", setup)
    done = {run_key(r) for r in results["runs"] if "error" not in r}
    todo = [
        (VARIANTS[v], b, k, n)
        for n in args.train_sizes
        for k in range(1, args.repeats + 1)
        for b in args.budgets
        for v in args.variants
        if args.rerun or (v, b, k, n) not in done
    ]
    if not todo:
        print("every requested run is in fidelity.json already (--rerun runs them again)")
    else:
        test_set = scoring_setup(args, data_dir, results)
        for variant, size in {(v, n) for v, _, _, n in todo if v.cache == "prefilled"}:  # before any run, timed alone
            prefilled_cache(variant, size, args, data_dir, results["caches"])
        for record in trained(todo, args, data_dir, results["caches"]):
            record = score(record, test_set, args.score_steps)
            results["runs"] = [r for r in results["runs"] if run_key(r) != run_key(record)] + [record]
            save_results(results, output_dir)
    save_results(results, output_dir)
    print("\n" + results_table(results))
    print(f"\nwritten: {output_dir / 'fidelity.json'}, {output_dir / 'fidelity.md'}, {output_dir / 'fidelity.png'}")


if __name__ == "__main__":
    cli.run(main)
