"""Is distillation worth it? Students trained for equal wall-clock budgets, with and without the teacher.

    python bench/fidelity.py --quick            # ~3.5 min: mlm vs kd-cache, 1 min each, tiny student
    python bench/fidelity.py --variants mlm-cache,kd-cache --budgets 10,30
                                                # the main comparison: ~95 min, 10.7 of them the cache fill
    python bench/fidelity.py --variants kd,kd-cache-t1 --budgets 792steps --jobs 2
                                                # quality per step, two runs at a time
    python bench/fidelity.py                    # every variant at 10 and 30 minutes: ~9 hours
    python bench/fidelity.py --variants mlm,kd-cache --budgets 1200steps --train_sizes 500,2000,all \
        --repeats 2 --jobs 2 --mask_variants 8 --d_model 128      # the regime map (README: What distillation buys)

Teacher: AntiBERTy, int8 on CPU (`--use_8bit`). Data: the 12,990 antibody chains of
../shared/data/antibody_sample.fasta when present (1,000 held out for test, 500 for validation),
else the shipped 1,000 of data/antibody_sample.fasta (100 / 100; the output says which). Every run
is one `distill.py --max_time MINUTES` subprocess, run one after another so that each has the
CPUs to itself, with the same student, data order, initialisation and learning rate; only the
loss and where the teacher's outputs come from differ (VARIANTS). Each final checkpoint is then
scored on the test split, which no run trains or validates on, with fixed masks and evaluate.py's
statistics (the teacher's test logits computed once): masked accuracy, top-1 agreement with the
teacher, KL(teacher || student) at T = 1, perplexity; and evaluate.py's fidelity measures at its
defaults: zero-shot mutation effects (Spearman with the teacher's masked marginals over 8 sites of
150 test chains, pooled and within a position), linear CKA of the last hidden states, and 10-NN
overlap of mean embeddings (1,000 test chains).

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
Masked LM and the cached KD variants cost the same per step (792 and 811 steps in 10 quiet
minutes here, 2,439 and 2,483 in 30), so among them a step budget is an equal-compute budget;
it also measures the quality per step of any variant, live teacher included. Unlike minutes, steps are not changed by other jobs,
so step-budget runs may share the machine: `--jobs 2` runs two at a time, one CPU thread each.

Wall-clock budgets are only as fair as the machine is quiet: each run records the optimizer steps
it reached, its tokens/s, the CPU time of its process and the load average before and after it,
and the plot shows accuracy by step too, which other jobs cannot distort.

Writes OUTPUT_DIR/fidelity.json (the setup, cache fills and every run: command, steps, times,
teacher batches, validation curve, test metrics), fidelity.md (the table) and fidelity.png
(validation masked accuracy and agreement against training minutes, accuracy against steps,
test accuracy marked at the end of each run). Runs already in fidelity.json are kept and
skipped (--rerun runs them again), so budgets and variants can be added by later invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from architecture import load_student  # noqa: E402
from pepemb import (
    cli,  # noqa: E402
    data,  # noqa: E402
    heldout,  # noqa: E402
)
from pepemb.cli import UserError  # noqa: E402
from pepemb.data import MaskedBatches  # noqa: E402
from pepemb.files import atomic_open  # noqa: E402

SHARED_ANTIBODIES = REPO.parent / "shared" / "data" / "antibody_sample.fasta"
TEACHER = "antiberty"
TEST_SEQUENCES, VAL_SEQUENCES = 1000, 500  # held out of the full antibody set
MAX_SEQ_LEN = 160  # antibody V domains are 101-136 residues: nothing is cropped
SEED = 42
MUTATION_POSITIONS = heldout.MUTATION_POSITIONS  # sites per chain for mutation effects: evaluate.py's default


@dataclass(frozen=True)
class Variant:
    name: str
    about: str
    loss: tuple[str, ...]  # distill.py loss flags
    cache: str | None = None  # None: live teacher; "prefilled": by cache_teacher.py before the run; "fill": during it
    positions: str = "masked"  # --distill_positions (what a cache stores)

    @property
    def teacher_in_loss(self) -> bool:
        """Whether training reads the teacher (else it only serves the validation agreement)."""
        return self.loss[self.loss.index("--distill_weight") + 1] != "0" or "--hidden_weight" in self.loss


@dataclass(frozen=True)
class Budget:
    """What a run may spend: wall-clock minutes (`10`), or optimizer steps (`800steps`). Step
    budgets compare variants whose steps cost the same (masked LM and the cached KD runs) or the
    quality per step of any two, and unlike minutes they are not changed by other jobs on the
    machine, so such runs may share it (--jobs)."""

    minutes: float | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        text = text.strip()
        if text.endswith("steps"):
            steps = int(text[: -len("steps")])
            if steps <= 0:
                raise ValueError
            return cls(steps=steps)
        minutes = float(text)
        if minutes <= 0:
            raise ValueError
        return cls(minutes=minutes)

    @classmethod
    def of(cls, record: dict) -> "Budget":
        return cls(minutes=record.get("budget_min"), steps=record.get("budget_steps"))

    @property
    def label(self) -> str:
        return f"{self.minutes:g} min" if self.minutes is not None else f"{self.steps} steps"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "")

    @property
    def flags(self) -> list[str]:
        return ["--max_time", f"{self.minutes:g}"] if self.minutes is not None else ["--max_steps", str(self.steps)]

    def sort_key(self) -> tuple:
        return (self.minutes is None, self.minutes or 0, self.steps or 0)


KD = ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "2")  # distill.py's defaults
VARIANTS = {
    v.name: v
    for v in [
        Variant(
            "mlm",
            "masked LM only: CE on the true residues, fresh masks each epoch, no teacher in training",
            ("--distill_weight", "0", "--task_weight", "1"),
        ),
        Variant(
            "mlm-cache",
            "mlm, validation teacher logits read from the prefilled cache (no teacher loaded): "
            "its evaluations cost what kd-cache's do",
            ("--distill_weight", "0", "--task_weight", "1"),
            cache="prefilled",
        ),
        Variant("kd", "0.9 KL at T=2 on masked positions + 0.1 CE (the defaults), live teacher", KD),
        Variant(
            "kd-hidden",
            "kd + 0.1 cosine loss to the teacher's last hidden states, live teacher",
            (*KD, "--hidden_weight", "0.1"),
        ),
        Variant("kd-cache", "kd, teacher logits read from a cache filled before the run", KD, cache="prefilled"),
        Variant("kd-cache-fill", "kd, teacher cache empty at the start and filled inside the budget", KD, cache="fill"),
        Variant(
            "kd-cache-all",
            "kd with the KL on every position, prefilled cache",
            (*KD, "--distill_positions", "all"),
            cache="prefilled",
            positions="all",
        ),
        Variant(
            "kd-cache-t1",
            "kd at temperature 1, prefilled cache",
            ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "1"),
            cache="prefilled",
        ),
        Variant(
            "kd-cache-t4",
            "kd at temperature 4, prefilled cache",
            ("--distill_weight", "0.9", "--task_weight", "0.1", "--temperature", "4"),
            cache="prefilled",
        ),
        Variant(
            "kd-cache-w0.5",
            "0.5 KL at T=2 + 0.5 CE (the defaults before this benchmark), prefilled cache",
            ("--distill_weight", "0.5", "--task_weight", "0.5", "--temperature", "2"),
            cache="prefilled",
        ),
    ]
}
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
    p.add_argument(
        "--train_sizes",
        default="all",
        help="comma-separated training-set sizes: the first N chains of a fixed shuffled training list "
        "(same validation and test chains), or 'all' [all]",
    )
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
    return args


# --------------------------------------------------------------------------------------------
# Data: one split for every run
# --------------------------------------------------------------------------------------------


def prepare_data(folder: Path, quick: bool) -> dict:
    """Write folder/{train,val,test}.fasta from the full antibody set (or the shipped sample);
    returns where they came from and the counts."""
    if not quick and SHARED_ANTIBODIES.is_file():
        source, note = SHARED_ANTIBODIES, "full antibody set"
        proteins = data.read_fasta(source)
        val_fraction, test_fraction = VAL_SEQUENCES / len(proteins), TEST_SEQUENCES / len(proteins)
    else:
        source = data.SHIPPED_ANTIBODIES
        note = (
            "--quick: shipped 1,000-chain sample"
            if quick
            else f"{SHARED_ANTIBODIES} not found: shipped 1,000-chain sample, numbers not comparable to the full set"
        )
        proteins = data.read_fasta(source)
        val_fraction = test_fraction = 0.1
    train, val, test = data.split_proteins(proteins, val_fraction, test_fraction, seed=SEED)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val), ("test", test)):
        data.write_fasta(folder / f"{name}.fasta", part)
    return {"source": str(source), "note": note, "train": len(train), "val": len(val), "test": len(test)}


def sized_data(data_dir: Path, size: int | None) -> Path:
    """The data folder of a training-set size: the first `size` chains of the training split in a
    fixed shuffled order (so a smaller set is part of every larger one), the same val and test."""
    if size is None:
        return data_dir
    folder = data_dir.with_name(f"{data_dir.name}-n{size}")
    train = data.read_fasta(data_dir / "train.fasta")
    if size > len(train):
        raise UserError(f"--train_sizes {size}: the training split has only {len(train):,} chains")
    if not (folder / "train.fasta").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data.write_fasta(folder / "train.fasta", random.Random(SEED).sample(train, len(train))[:size])
        for name in ("val", "test"):
            shutil.copyfile(data_dir / f"{name}.fasta", folder / f"{name}.fasta")
    return folder


def size_label(size: int | None) -> str:
    return "all" if size is None else f"{size:,}"


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def shared_flags(args, data_dir: Path) -> list[str]:
    """What distill.py and cache_teacher.py must agree on for a cache to serve a run."""
    return [
        "--data_path",
        str(data_dir),
        "--teacher_model",
        TEACHER,
        "--use_8bit",
        "--device",
        args.device,
        "--max_seq_len",
        str(MAX_SEQ_LEN),
        "--batch_size",
        str(args.batch_size),
        "--seed",
        str(SEED),
        "--mask_variants",
        str(args.mask_variants),
    ]


def distill_command(
    variant: Variant, budget: Budget, run_dir: Path, cache_dir: Path | None, args, data_dir: Path
) -> list[str]:
    command = [
        sys.executable,
        str(REPO / "distill.py"),
        *shared_flags(args, data_dir),
        *variant.loss,
        "--output_dir",
        str(run_dir),
        "--overwrite",
        "--d_model",
        str(args.d_model),
        "--num_heads",
        str(args.num_heads),
        "--num_layers",
        str(args.num_layers),
        "--learning_rate",
        str(args.learning_rate),
        "--warmup_steps",
        str(args.warmup_steps),
        *budget.flags,
        "--num_epochs",
        "1000",
        "--eval_every",
        str(args.eval_every),
        "--log_every",
        "5",
        "--save_every",
        "1000000",
        "--keep_last",
        "1",
    ]
    if cache_dir is not None:
        command += ["--teacher_cache", str(cache_dir)]
    if args.max_steps and budget.steps is None:
        command += ["--max_steps", str(args.max_steps)]
    return command


def run_logged(command: list[str], log_path: Path, threads: int | None = None) -> tuple[int, float, float | None]:
    """Run a command with its output in log_path (on `threads` CPU threads if given); returns
    (exit status, wall seconds, CPU seconds). CPU time (user + system) does not grow when other
    jobs share the cores, wall time does; it is None when other runs go on alongside."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return status, time.perf_counter() - start, None if threads else _children_cpu_s() - cpu_start


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log_tail(log_path: Path, lines: int = 15) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def fill_cache(cache_dir: Path, positions: str, args, data_dir: Path) -> dict:
    """Fill a teacher cache with cache_teacher.py (timed); a cache already complete is reused
    with the record of its fill."""
    record_path = cache_dir.with_name(cache_dir.name + ".fill.json")
    if record_path.is_file():
        return json.loads(record_path.read_text())
    shutil.rmtree(cache_dir, ignore_errors=True)  # a half-filled one: time a whole fill
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(REPO / "cache_teacher.py"),
        *shared_flags(args, data_dir),
        "--distill_positions",
        positions,
        "--teacher_cache",
        str(cache_dir),
    ]
    print(
        f"filling the teacher cache {cache_dir} ({positions} positions, {args.mask_variants} mask variant(s))",
        flush=True,
    )
    status, seconds, cpu_seconds = run_logged(command, cache_dir.with_name(cache_dir.name + ".fill.log"))
    if status:
        raise UserError(
            f"cache_teacher.py failed (exit {status}); see {cache_dir.name}.fill.log:\n"
            + log_tail(cache_dir.with_name(cache_dir.name + ".fill.log"))
        )
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    record = {
        "dir": str(cache_dir),
        "positions": positions,
        "mask_variants": args.mask_variants,
        "fill_s": seconds,
        "fill_cpu_s": cpu_seconds,
        "command": " ".join(command),
        "complete": manifest["complete"],
        "bytes": sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file()),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"  filled in {seconds / 60:.1f} min", flush=True)
    return record


def learning_curve(metrics_path: Path, end_s: float) -> list[dict]:
    """The validation records with the training time at which each was taken: their own
    elapsed_s, else interpolated from the train records' elapsed_s (0 at step 0; end_s for a
    final evaluation after the last train record)."""
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [(0, 0.0)] + [(r["step"], r["elapsed_s"]) for r in records if r["split"] == "train"]
    steps, seconds = zip(*train)
    return [
        {
            "step": r["step"],
            "elapsed_s": r.get("elapsed_s", float(np.interp(r["step"], steps, seconds, right=end_s))),
            "masked_acc": r["masked_acc"],
            "agreement": r["agreement"],
            "kl": r["kl"],
            "perplexity": r["perplexity"],
        }
        for r in records
        if r["split"] == "val"
    ]


def tokens_per_second(metrics_path: Path) -> float | None:
    """Training tokens/s over the run (the mean of the logged windows, all of equal step count)."""
    rates = [
        r["tokens_per_s"]
        for r in map(json.loads, open(metrics_path))
        if r["split"] == "train" and r.get("tokens_per_s")
    ]
    return float(np.mean(rates)) if rates else None


def run_key(record: dict) -> tuple:
    """What identifies a run in fidelity.json: variant, budget, repeat and training-set size."""
    return record["variant"], Budget.of(record), record.get("repeat", 1), record.get("train_size")


def run_dir_of(variant: Variant, budget: Budget, repeat: int, size: int | None, args) -> Path:
    return (
        args.output_dir
        / "runs"
        / (f"{variant.name}-{budget.slug}" + (f"-n{size}" if size else "") + (f"-r{repeat}" if repeat > 1 else ""))
    )


def prefilled_cache(variant: Variant, size: int | None, args, data_dir: Path, caches: dict) -> dict:
    """The fill record of the prefilled cache the variant reads (filled now if missing)."""
    key = f"{variant.positions}-k{args.mask_variants}" + (f"-n{size}" if size else "")
    if key not in caches:
        caches[key] = fill_cache(args.output_dir / "caches" / key, variant.positions, args, sized_data(data_dir, size))
    return caches[key]


def train(variant: Variant, budget: Budget, repeat: int, size: int | None, args, data_dir: Path, caches: dict) -> dict:
    """One distill.py run; returns its record (without test scores). Prefilled caches must be
    in `caches` already: runs may go on in parallel."""
    run_dir = run_dir_of(variant, budget, repeat, size, args)
    cache_dir, fill = None, None
    if variant.cache == "prefilled":
        fill = prefilled_cache(variant, size, args, data_dir, caches)  # filled by main() before any run starts
        cache_dir = Path(fill["dir"])
    elif variant.cache == "fill":
        cache_dir = run_dir.with_name(run_dir.name + "-cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
    command = distill_command(variant, budget, run_dir, cache_dir, args, sized_data(data_dir, size))
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    print(
        f"{variant.name}, {budget.label}, {size_label(size)} training chains"
        + (f", repeat {repeat}" if repeat > 1 else "")
        + f": {variant.about} (load average {load_before:.2f})",
        flush=True,
    )
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    status, process_s, process_cpu_s = run_logged(command, run_dir / "log.txt", threads)
    record = {
        "variant": variant.name,
        "about": variant.about,
        "budget_min": budget.minutes,
        "budget_steps": budget.steps,
        "repeat": repeat,
        "train_size": size,
        "mask_variants": args.mask_variants,
        "command": " ".join(command),
        "threads": threads,
        "process_s": process_s,
        "process_cpu_s": process_cpu_s,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    if status:
        print(f"  {variant.name}, {budget.label} failed (exit {status}):\n{log_tail(run_dir / 'log.txt')}", flush=True)
        return {**record, "error": f"exit {status}: {log_tail(run_dir / 'log.txt')}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    end_s = summary["elapsed_s"] if budget.minutes is None else min(summary["elapsed_s"], budget.minutes * 60)
    record.update(
        steps=summary["steps"],
        training_s=summary["elapsed_s"],
        tokens_per_s=tokens_per_second(run_dir / "metrics.jsonl"),
        teacher_loaded=summary["teacher_loaded"],
        teacher_batches=summary["teacher_batches"],
        cache_fill_s=fill["fill_s"] if fill and variant.teacher_in_loss else None,
        final_val=summary["final_val"],
        # the last step ends once the budget is spent; the final evaluation comes after it
        curve=learning_curve(run_dir / "metrics.jsonl", end_s),
        checkpoint=summary["last_checkpoint"],
    )
    return record


def trained(todo, args, data_dir: Path, caches: dict):
    """The records of the runs in `todo` as they finish. One at a time, each run has the machine
    to itself: the caller scores it before the next starts. With --jobs J, J run at once."""
    if args.jobs == 1:
        for variant, budget, repeat, size in todo:
            yield train(variant, budget, repeat, size, args, data_dir, caches)
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        running = [pool.submit(train, *run, args, data_dir, caches) for run in todo]
        for finished in as_completed(running):
            yield finished.result()


def score(record: dict, test_set: "TestSet") -> dict:
    """The record with its final checkpoint's scores on the test split."""
    if "error" in record:
        return record
    record = {**record, "test": test_set.score(record["checkpoint"])}
    t = record["test"]
    print(
        f"  {record['variant']}, {Budget.of(record).label}, repeat {record.get('repeat', 1)}: {record['steps']} steps in "
        f"{record['training_s'] / 60:.1f} min: test masked acc {t['masked_acc']:.3f}, agreement {t['agreement']:.3f}, "
        f"KL {t['kl']:.3f}, perplexity {t['perplexity']:.2f}",
        flush=True,
    )
    return record


# --------------------------------------------------------------------------------------------
# Test-split scoring
# --------------------------------------------------------------------------------------------


class TestSet:
    """The test split under fixed masks (evaluate.py's: the validation masks of its seed), with the
    teacher's logits computed once and replayed, so that every student is scored by
    evaluation.masked_statistics on the same positions against the same teacher outputs."""

    def __init__(self, fasta: Path, args):
        from pepemb.teacher import load_teacher  # transformers is heavy: only once there is data to score

        self.device = torch.device(args.device)
        teacher = load_teacher(TEACHER, device=self.device, use_8bit=True)
        self.tokenizer, self.teacher_backend = teacher.tokenizer, teacher.backend
        sequences = [p.sequence for p in data.read_fasta(fasta)]
        masking = data.Masking(max_seq_len=MAX_SEQ_LEN, mask_prob=0.15, seed=SEED, batch_size=args.batch_size)
        self.batches = MaskedBatches(sequences, self.tokenizer, masking, epoch=0, train=False)
        self.residues = heldout.residue_counts(self.batches.unmasked(), self.tokenizer)
        self._logits = {}
        for i in range(len(self.batches)):
            batch = {k: v.to(self.device) for k, v in self.batches[i].items()}
            self._logits[self._key(batch["input_ids"])] = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        self.sequences = len(sequences)
        # evaluate.py's fidelity measures at its defaults, the teacher's side computed once
        self.probe = heldout.MutationProbe(
            sequences,
            self.tokenizer,
            proteins=args.mutation_proteins,
            positions=MUTATION_POSITIONS,
            seed=SEED,
            max_seq_len=MAX_SEQ_LEN,
        )
        self.teacher_mutation_scores = self.probe.scores(teacher, self.device)
        chosen = [sequences[i] for i in heldout.sample_proteins(len(sequences), args.embedding_proteins, SEED)]
        self.unmasked = MaskedBatches(chosen, self.tokenizer, masking, epoch=0, train=False).unmasked()
        self.teacher_states = heldout.last_hidden_states(teacher, self.unmasked, self.device)
        self.baseline_mutations = self.probe.agreement(self.probe.baseline, self.teacher_mutation_scores)

    @staticmethod
    def _key(input_ids: torch.Tensor) -> bytes:
        return input_ids.cpu().numpy().tobytes()

    def __call__(self, input_ids, attention_mask) -> dict:
        """The teacher's interface, as masked_statistics calls it, for a test batch."""
        return {"logits": self._logits[self._key(input_ids)]}

    def score(self, model_path) -> dict:
        student, tokenizer, _ = load_student(model_path, map_location=self.device)
        if tokenizer.vocab_hash != self.tokenizer.vocab_hash:
            raise UserError(f"{model_path}: the student's vocabulary is not the teacher's")
        stats = heldout.masked_statistics(student, self, self.batches, self.device)
        m = heldout.build_report(stats, self.residues, tokenizer, None)["metrics"]
        mutations = self.probe.agreement(self.probe.scores(student, self.device), self.teacher_mutation_scores)
        reps = heldout.representation_measures(
            heldout.last_hidden_states(student, self.unmasked, self.device), self.teacher_states, seed=SEED
        )
        return {
            "mutation_spearman": mutations["spearman"],
            "mutation_spearman_per_protein": mutations["spearman_per_protein_mean"],
            "mutation_spearman_within_position": mutations["spearman_within_position_mean"],
            "cka": reps["cka"],
            "knn_overlap": reps["knn_overlap"],
            "knn_chance": reps["knn_chance"],
            "masked_acc": m["student"]["masked_acc"],
            "agreement": m["agreement"],
            "kl": m["kl_teacher_student"],
            "perplexity": m["student"]["perplexity"],
            "teacher_masked_acc": m["teacher"]["masked_acc"],
            "teacher_perplexity": m["teacher"]["perplexity"],
            "baseline_masked_acc": m["baseline"]["masked_acc"],
            "masked_tokens": stats["n"],
        }


# --------------------------------------------------------------------------------------------
# Results: JSON, table, plot
# --------------------------------------------------------------------------------------------


def load_results(path: Path, setup: dict) -> dict:
    """Earlier results in this folder, if made with the same setup; else a new record."""
    if not path.is_file():
        return {"setup": setup, "caches": {}, "runs": []}
    results = json.loads(path.read_text())
    differ = [k for k in setup if k not in ("started", "machine") and results["setup"].get(k) != setup[k]]
    if differ:
        raise UserError(
            f"{path} holds runs made with other settings ({', '.join(differ)}); pass another --output_dir or delete it"
        )
    return results


def save_results(results: dict, output_dir: Path) -> None:
    with atomic_open(output_dir / "fidelity.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_open(output_dir / "fidelity.md", "w") as f:
        f.write(results_table(results) + "\n")
    plot_results(results, output_dir / "fidelity.png")
    plot_regimes(results, output_dir / "fidelity_regimes.png")


MEASURES = (
    ("masked_acc", "test acc"),
    ("mutation_spearman", "mutation ρ"),
    ("mutation_spearman_within_position", "ρ within position"),
    ("cka", "CKA"),
    ("knn_overlap", "10-NN overlap"),
)


def _value(record: dict, key: str, spec: str = ".3f") -> str:
    value = record.get("test", {}).get(key)
    return "—" if value is None else format(value, spec)


def _sort_key(r: dict) -> tuple:
    return (
        r.get("train_size") or 10**9,
        Budget.of(r).sort_key(),
        list(VARIANTS).index(r["variant"]),
        r.get("repeat", 1),
    )


def results_table(results: dict) -> str:
    setup = results["setup"]
    teacher = next((r["test"] for r in results["runs"] if "test" in r), None)
    base = setup.get("baseline_mutations")
    lines = [
        f"Data: {setup['data']['note']} ({setup['data']['train']:,} train / {setup['data']['val']:,} val / "
        f"{setup['data']['test']:,} test chains). Student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers, {setup['student']['num_heads']} heads; "
        f"batch {setup['batch_size']}, lr {setup['learning_rate']:g}, warmup {setup['warmup_steps']} steps. "
        f"Teacher {TEACHER} ({setup.get('teacher_backend')})"
        + (
            f": test masked acc {teacher['teacher_masked_acc']:.3f}, perplexity {teacher['teacher_perplexity']:.2f}"
            if teacher
            else ""
        )
        + "."
        + (
            f" Mutation effects: {MUTATION_POSITIONS} sites in each of {setup['mutation_proteins']} test chains, "
            f"19 substitutions each; the residue-frequency baseline scores ρ {base['spearman']:.3f} "
            f"(within position {base['spearman_within_position_mean'] or 0:.3f})."
            if base
            else ""
        ),
        "",
        "| variant | training chains | budget | steps | mask variants | training (min) | process CPU (min) "
        "| tokens/s | teacher batches live / cached | cache fill outside budget (min) | test acc | agreement "
        "| KL | perplexity | mutation ρ | ρ within position | CKA | 10-NN overlap | load avg before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results["runs"], key=_sort_key):
        budget = Budget.of(r).label + (f" (repeat {r['repeat']})" if r.get("repeat", 1) > 1 else "")
        size = size_label(r.get("train_size"))
        if "error" in r:
            lines.append(f"| {r['variant']} | {size} | {budget} | failed: {r['error'].splitlines()[0]} |")
            continue
        t, live = r["test"], r["teacher_batches"]
        fill = f"{r['cache_fill_s'] / 60:.1f}" if r["cache_fill_s"] else "—"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        cpu = f"{r['process_cpu_s'] / 60:.1f}" if r.get("process_cpu_s") is not None else "—"
        variant = VARIANTS.get(r["variant"])
        replays_masks = variant is not None and variant.cache is not None and variant.teacher_in_loss
        masks = r.get("mask_variants", "—") if replays_masks else "fresh"  # masked LM draws new masks every epoch
        if r.get("threads"):  # runs that shared the machine: their times say little
            rate += f" ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, shared)"
        lines.append(
            f"| {r['variant']} | {size} | {budget} | {r['steps']} | {masks} "
            f"| {r['training_s'] / 60:.1f} | {cpu} | {rate} | {live['live']} / {live['cached']} | {fill} "
            f"| {t['masked_acc']:.3f} | {t['agreement']:.3f} | {t['kl']:.3f} | {t['perplexity']:.2f} "
            f"| {_value(r, 'mutation_spearman')} | {_value(r, 'mutation_spearman_within_position')} "
            f"| {_value(r, 'cka')} | {_value(r, 'knn_overlap')} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    groups = regime_groups(results)
    if any(len(runs) > 1 for runs in groups.values()):
        lines += [
            "",
            "Repeated runs: mean (min-max) over the repeats",
            "",
            "| variant | training chains | budget | runs | " + " | ".join(label for _, label in MEASURES) + " |",
            "|---|---:|---|---:|" + "---:|" * len(MEASURES),
        ]
        for (variant, size, budget), runs in sorted(groups.items(), key=lambda g: _sort_key(g[1][0])):
            if len(runs) > 1:
                lines.append(
                    f"| {variant} | {size_label(size)} | {budget.label} | {len(runs)} | "
                    + " | ".join(spread_text([r["test"].get(k) for r in runs]) for k, _ in MEASURES)
                    + " |"
                )
    return "\n".join(lines)


def regime_groups(results: dict) -> dict:
    """The scored runs grouped by (variant, training-set size, budget): the repeats of one setting."""
    groups = {}
    for r in results["runs"]:
        if "error" not in r:
            groups.setdefault((r["variant"], r.get("train_size"), Budget.of(r)), []).append(r)
    return groups


def spread_text(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def plot_results(results: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r]
    if not runs:
        return
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(VARIANTS)}
    budgets = sorted({Budget.of(r) for r in runs}, key=Budget.sort_key)
    styles = dict(zip(budgets, ["-", "--", ":", "-."] * len(budgets)))
    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    panels = (
        (axes[0], "masked_acc", "masked accuracy", "minutes"),
        (axes[1], "agreement", "top-1 agreement", "minutes"),
        (axes[2], "masked_acc", "masked accuracy", "step"),
    )
    for ax, key, title, x in panels:
        for r in runs:
            budget = Budget.of(r)
            if x == "minutes" and budget.minutes is None:
                continue  # step-budget runs may have shared the machine: their minutes mean little
            xs = [p["elapsed_s"] / 60 if x == "minutes" else p["step"] for p in r["curve"]]
            label = (
                f"{r['variant']} {budget.label}"
                + (f", {r['train_size']:,} chains" if r.get("train_size") else "")
                + (f" #{r['repeat']}" if r.get("repeat", 1) > 1 else "")
                + (f" ({r['steps']} steps)" if budget.minutes else "")
            )
            ax.plot(
                xs,
                [p[key] for p in r["curve"]],
                styles[budget],
                color=colors[r["variant"]],
                marker="o",
                ms=3,
                label=label,
            )
            ax.plot(xs[-1], r["test"][key], "*", color=colors[r["variant"]], ms=12, mec="black")
            if r["cache_fill_s"] and x == "minutes":  # the curve had the cache fill been paid inside the budget
                ax.plot(
                    [m + r["cache_fill_s"] / 60 for m in xs],
                    [p[key] for p in r["curve"]],
                    ":",
                    color=colors[r["variant"]],
                    alpha=0.5,
                    label=f"{r['variant']} {budget.label}, shifted by its cache fill",
                )
        if key == "masked_acc":
            ax.axhline(runs[0]["test"]["teacher_masked_acc"], ls="--", color="grey", label="teacher (test)")
        # the early climb is alike for all: show where the runs end, which is where they differ
        ax.set_ylim(bottom=max(0.0, min(r["test"][key] for r in runs) - 0.25))
        # Steps are what a shared machine cannot distort: wall-clock budgets buy more or fewer of them.
        ax.set(
            xlabel="training wall-clock minutes" if x == "minutes" else "optimizer step",
            ylabel=title,
            title=f"Validation {title} by {x} (lines), test at the end (stars)",
        )
        ax.grid(alpha=0.3)
    legend = {}  # one legend for the three panels, below them, where it hides no curve
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    setup = results["setup"]
    fig.suptitle(
        f"{TEACHER} -> student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers; {setup['data']['note']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04 * (1 + len(legend) // 4), 1, 1))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


MIN_Y_SPAN = 0.1  # of a measure's axis in the regime plot: differences under ~0.02 are run-to-run noise


def plot_regimes(results: dict, png_path: Path) -> None:
    """Every measure against the training-set size (one line per variant and budget) and against
    the wall-clock budget (one line per variant and size): where a teacher pays, and where not."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = regime_groups(results)
    n_train = results["setup"]["data"]["train"]
    by_size, by_minutes = {}, {}  # series -> {x: runs}
    for (variant, size, budget), runs in groups.items():
        by_size.setdefault((variant, budget.label), {})[size or n_train] = runs
        if budget.minutes is not None:
            by_minutes.setdefault((variant, size_label(size)), {})[budget.minutes] = runs
    rows = [
        (name, series)
        for name, series in (("training chains", by_size), ("wall-clock budget (min)", by_minutes))
        if any(len(points) > 1 for points in series.values())
    ]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(MEASURES), figsize=(4.2 * len(MEASURES), 3.8 * len(rows)), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(VARIANTS)}
    base = results["setup"].get("baseline_mutations") or {}
    for (xlabel, series), ax_row in zip(rows, axes):
        for ax, (key, label) in zip(ax_row, MEASURES):
            for (variant, which), points in sorted(series.items()):
                if len(points) < 2:
                    continue
                xs = sorted(points)
                values = [[r["test"].get(key) for r in points[x] if r["test"].get(key) is not None] for x in xs]
                means = [np.mean(v) if v else np.nan for v in values]
                low = [m - min(v) if v else 0 for m, v in zip(means, values)]
                high = [max(v) - m if v else 0 for m, v in zip(means, values)]
                ax.errorbar(
                    xs,
                    means,
                    yerr=[low, high],
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=colors[variant],
                    ls="-" if variant.startswith("kd") else "--",
                    label=f"{variant}, {which}",
                )
            if key == "mutation_spearman" and base.get("spearman") is not None:
                ax.axhline(base["spearman"], color="grey", ls=":", label="residue-frequency baseline")
            if xlabel == "training chains":
                sizes = sorted({x for points in series.values() for x in points})
                ax.set_xscale("log")
                ax.set_xticks(sizes, [f"{x:,}" for x in sizes])  # plain numbers, not 2x10^3 (mathtext)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            low_y, high_y = ax.get_ylim()
            if high_y - low_y < MIN_Y_SPAN:  # a 0.005 wiggle should not fill the panel
                middle = (low_y + high_y) / 2
                ax.set_ylim(middle - MIN_Y_SPAN / 2, middle + MIN_Y_SPAN / 2)
            ax.set(xlabel=xlabel, title=label)
            ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    setup = results["setup"]
    fig.suptitle(
        f"What distillation buys: {TEACHER} -> student d_model {setup['student']['d_model']}, "
        f"{setup['student']['num_layers']} layers; test split of {setup['data']['note']} "
        "(mean of repeats, bars: min-max)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05 * (1 + len(legend) // 4), 1, 1))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    output_dir = args.output_dir
    data_dir = output_dir / "data"
    setup = {
        "data": prepare_data(data_dir, args.quick),
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
    print(
        f"data: {setup['data']['note']}: {setup['data']['train']:,} train / {setup['data']['val']:,} val / "
        f"{setup['data']['test']:,} test chains",
        flush=True,
    )
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
        print(f"scoring set-up: the teacher on the {setup['data']['test']:,} test chains, once", flush=True)
        test_set = TestSet(data_dir / "test.fasta", args)
        results["setup"]["teacher_backend"] = test_set.teacher_backend
        results["setup"]["baseline_mutations"] = test_set.baseline_mutations
        for variant, size in {(v, n) for v, _, _, n in todo if v.cache == "prefilled"}:  # before any run, timed alone
            prefilled_cache(variant, size, args, data_dir, results["caches"])
        for record in trained(todo, args, data_dir, results["caches"]):
            record = score(record, test_set)
            results["runs"] = [r for r in results["runs"] if run_key(r) != run_key(record)] + [record]
            save_results(results, output_dir)
    save_results(results, output_dir)
    print("\n" + results_table(results))
    print(f"\nwritten: {output_dir / 'fidelity.json'}, {output_dir / 'fidelity.md'}, {output_dir / 'fidelity.png'}")


if __name__ == "__main__":
    cli.run(main)
