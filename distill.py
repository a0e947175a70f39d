"""Distil a HuggingFace masked-LM teacher (ProtBert by default) into a small RoPE student.

    python distill.py --data_path data/unref_50 --output_dir checkpoints \
        --teacher_model Rostlab/prot_bert --d_model 384 --num_heads 6 --num_layers 4 \
        --distill_weight 0.5 --task_weight 0.5 --batch_size 32 --max_seq_len 512 \
        --learning_rate 5e-5 --num_epochs 10 --fp16 --use_wandb

Loss on masked positions (masked LM at --mask_prob):
    distill_weight * T^2 * KL(softmax(t/T) || softmax(s/T))  +  task_weight * CE(s, true residue)
    [+ hidden_weight * (1 - cos(proj(student_hidden), teacher_hidden))]

The loop is flat, top to bottom, like nanoGPT's train.py. Every batch is rebuilt from
(seed, epoch, batch index) and checkpoints hold every RNG, so `--resume` continues exactly.
Each sequence's crop and mask come from (seed, mask variant, sequence index) alone: epoch e
uses variant e (fresh masks every epoch), validation a fixed one.

With --teacher_cache DIR the teacher runs once per (mask variant, sequence): epoch e uses
variant e mod --mask_variants, the first K epochs store the teacher's logits in DIR as they are
computed and later epochs, and later runs with the same data and masking, read them instead
(see teacher_cache.py; cache_teacher.py fills DIR ahead of training).

Several GPUs or machines: `torchrun --nproc_per_node N distill.py ...` (DistributedDataParallel;
nccl on CUDA, gloo on CPU). Every rank builds the same epoch of batches and takes every N-th
batch of each optimizer step, so a step trains on N x --grad_accumulation_steps batches (the
global batch; the learning rate is not scaled for you), the same batches as one process
accumulating N x as many. Each rank runs its own frozen copy of the teacher; rank 0 alone
prints, logs and writes checkpoints, which hold the position in the global list of batches and
so resume on any number of processes. A cache is read by every rank but filled only by one
process (or by cache_teacher.py under torchrun).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

import cli
import data
from architecture import CheckpointError, Student, StudentConfig, atomic_open, load_student, save_student
from cli import UserError
from teacher_cache import TeacherCache, TeacherTargets, data_hash, describe_teacher, run_settings

TRAINING_STATE = "training_state.pt"
# What the training log sums between two records (over all ranks when there are several).
WINDOW_SUMS = ("tokens", "seqs", "masked", "loss", "kl", "ce", "cos", "correct", "agree")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(p)
    add_teacher_arguments(p)

    g = p.add_argument_group("student")
    g.add_argument("--d_model", type=int, default=384, help="hidden size")
    g.add_argument("--num_heads", type=int, default=6, help="attention heads (must divide d_model)")
    g.add_argument("--num_layers", type=int, default=4, help="transformer blocks")
    g.add_argument("--d_ff", type=int, default=None, help="feed-forward size (default 4 x d_model)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the student")

    g = p.add_argument_group("loss")
    g.add_argument("--distill_weight", type=float, default=0.9,
                   help="weight of the KL term (README: \"Does distillation help?\")")
    g.add_argument("--task_weight", type=float, default=0.1, help="weight of the masked-LM cross-entropy")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KL term")
    g.add_argument("--hidden_weight", type=float, default=0.0,
                   help="weight of a cosine loss between projected student and teacher last hidden states")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--scheduler", choices=["linear", "cosine"], default="linear", help="decay after warmup")
    g.add_argument("--num_epochs", type=int, default=10, help="passes over the training split")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--max_time", type=float, default=None, metavar="MINUTES",
                   help="train for this wall-clock budget: after warmup the learning rate decays with the "
                        "fraction of the budget used (or of --max_steps / --num_epochs, if they end the run "
                        "first), and the run ends with an evaluation and a checkpoint")
    g.add_argument("--grad_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="stop after this many non-finite losses in a row (each one is skipped)")

    add_device_arguments(p)

    g = p.add_argument_group("evaluation, checkpoints, monitoring")
    g.add_argument("--output_dir", default="checkpoints", help="checkpoints, metrics and plots go here")
    g.add_argument("--eval_every", type=int, default=500, help="evaluate every N steps (and at each epoch end)")
    g.add_argument("--save_every", type=int, default=1000, help="write checkpoint-STEP/ every N steps")
    g.add_argument("--keep_last", type=int, default=3, help="keep only the newest N checkpoint-STEP folders")
    g.add_argument("--resume", default=None, help="'auto' (newest checkpoint in output_dir) or a checkpoint folder")
    g.add_argument("--overwrite", action="store_true", help="allow an output_dir that holds another run")
    g.add_argument("--log_every", type=int, default=10, help="write a metrics.jsonl record every N steps")
    g.add_argument("--use_wandb", action="store_true", help="also log to Weights & Biases (see setup_wandb.py)")
    g.add_argument("--wandb_project", default="pepemb-distill", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name")
    return p


# Argument groups shared with cache_teacher.py, so that both read data, teacher and masks alike.

def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True,
                   help="folder with train/val/test.fasta (download_sample_data.py) or one FASTA "
                        "file, split deterministically")
    g.add_argument("--max_seq_len", type=int, default=512,
                   help="tokens per sequence incl. start/end; longer ones are cropped "
                        "(random window in training, fixed in evaluation)")
    g.add_argument("--batch_size", type=int, default=32, help="sequences per batch (ignored with --max_tokens)")
    g.add_argument("--max_tokens", type=int, default=None,
                   help="token budget per batch (padded tokens) instead of --batch_size, like ESM's toks_per_batch")
    g.add_argument("--mask_prob", type=float, default=0.15, help="fraction of residues masked (80/10/10)")
    g.add_argument("--val_fraction", type=float, default=0.1, help="validation share when --data_path is one file")
    g.add_argument("--test_fraction", type=float, default=0.1, help="test share when --data_path is one file")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes for batch building")
    g.add_argument("--seed", type=int, default=42, help="seeds the split, data order, masks, init and dropout")


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher and teacher cache")
    g.add_argument("--teacher_model", default="Rostlab/prot_bert",
                   help="HF masked LM: Hub id, local folder (save_pretrained), or 'antiberty' (offline)")
    g.add_argument("--use_8bit", action="store_true",
                   help="8-bit teacher: bitsandbytes on CUDA, torch dynamic int8 on CPU")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow a Hub teacher to run its own code (off unless you trust it)")
    g.add_argument("--distill_positions", choices=["masked", "all"], default="masked",
                   help="where the KL term is taken, and what a teacher cache stores: masked positions "
                        "or every non-pad position")
    g.add_argument("--teacher_cache", default=None, metavar="DIR",
                   help="keep the teacher's logits in DIR (fp16; with a 30-token vocabulary about 9 bytes per "
                        "token and mask variant, 60 with --distill_positions all): the first --mask_variants "
                        "epochs fill it, later epochs and later runs with the same data, teacher and masking "
                        "read it without loading the teacher")
    g.add_argument("--mask_variants", type=int, default=4,
                   help="with --teacher_cache: fixed masks per training sequence (epoch e uses variant e mod K); "
                        "more variants mean more mask diversity but more teacher passes and disk")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to train")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 autocast + GradScaler, fp16 teacher (CUDA; falls back to fp32 on CPU)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast, fp16 teacher (CUDA; allowed but slow on most CPUs)")
    g.add_argument("--dist_timeout", type=float, default=30.0, metavar="MINUTES",
                   help="under torchrun: how long a process waits for the others at a synchronisation point "
                        "before the job fails")


def validate_args(args) -> None:
    """Every flag problem, found before any model is loaded."""
    validate_shared_args(args)
    positive = ["num_epochs", "grad_accumulation_steps", "eval_every", "save_every", "log_every", "d_model",
                "num_heads", "num_layers", "max_bad_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ["max_steps", "d_ff", "max_time"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ["warmup_steps", "keep_last", "weight_decay", "max_grad_norm",
                 "distill_weight", "task_weight", "hidden_weight"]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(args, name)})")
    if args.d_model % args.num_heads:
        raise UserError(f"--num_heads {args.num_heads} does not divide --d_model {args.d_model}")
    if (args.d_model // args.num_heads) % 2:
        raise UserError(f"head size d_model/num_heads = {args.d_model // args.num_heads} must be even for RoPE")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {args.temperature})")
    if args.distill_weight == 0 and args.task_weight == 0 and args.hidden_weight == 0:
        raise UserError("all loss weights are 0: set --distill_weight and/or --task_weight")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1) (got {args.dropout})")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if args.teacher_cache and args.hidden_weight > 0:
        raise UserError("--teacher_cache stores logits only; drop --hidden_weight or the cache")


def validate_shared_args(args) -> None:
    """The checks of the data, teacher and device arguments (cache_teacher.py's too)."""
    for name in ["max_seq_len", "batch_size", "mask_variants"]:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UserError(f"--max_tokens must be positive (got {args.max_tokens})")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must not be negative (got {args.num_workers})")
    if args.max_seq_len < 3:
        raise UserError("--max_seq_len must leave room for start, end and one residue (>= 3)")
    if args.max_tokens is not None and args.max_tokens < args.max_seq_len:
        raise UserError(f"--max_tokens {args.max_tokens} is smaller than --max_seq_len {args.max_seq_len}: "
                        "a full-length sequence would not fit in a batch")
    if not 0 < args.mask_prob < 1:
        raise UserError(f"--mask_prob must be between 0 and 1 (got {args.mask_prob})")
    if args.fp16 and args.bf16:
        raise UserError("choose one of --fp16 and --bf16")
    if args.dist_timeout <= 0:
        raise UserError(f"--dist_timeout must be positive (got {args.dist_timeout})")


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def resolve_precision(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the student, or None for fp32. fp16 needs CUDA: elsewhere fp32."""
    if args.fp16:
        if device.type == "cuda":
            return torch.float16
        warnings.warn(f"--fp16 needs a CUDA GPU; training in fp32 on {device.type}", stacklevel=2)
        return None
    if args.bf16:
        if device.type == "cpu":
            print("note: bf16 on CPU runs through autocast; on CPUs without AMX/AVX512-BF16 it is "
                  "several times slower than fp32")
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------------------------
# Processes: one, or one rank of a torchrun job
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size` processes, `local_rank` on its
    machine. With size 1 (no torchrun) every collective below is a no-op."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs, writes metrics, W&B, plots and checkpoints."""
        return self.rank == 0


def join_world(device: torch.device, timeout_minutes: float) -> tuple[World, torch.device]:
    """(World, device) of this process. Under torchrun (WORLD_SIZE > 1) it joins the process
    group: nccl with GPU LOCAL_RANK as this process's device on CUDA, gloo on CPU; a collective
    that waits longer than `timeout_minutes` for another rank fails. Otherwise World(), `device`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]))
    if device.type == "mps":
        raise UserError("several processes need CUDA GPUs or CPUs; on MPS run distill.py as one process")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU of its own ({torch.cuda.device_count()} on "
                            "this machine): pass --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return world, device


def all_reduce(values: list[float], world: World, op: str = "sum") -> list[float]:
    """Each value summed (op "max": its maximum) over the ranks; alone, the values themselves."""
    if world.size == 1:
        return values
    nccl = dist.get_backend() == "nccl"  # nccl reduces CUDA tensors only
    tensor = torch.tensor(values, dtype=torch.float64, device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(world: World) -> None:
    """Wait until every rank is here."""
    if world.size > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def optimizer_steps(n_batches: int, start: int, batches_per_step: int, world_size: int) -> list[range]:
    """The optimizer steps of an epoch from its batch `start` on, each the range of (global) batch
    numbers it trains on: batches_per_step = processes x --grad_accumulation_steps of them, the
    epoch's last step fewer. Rank r takes every world_size-th batch of a step from the r-th, so a
    step is the same set of batches, weighted alike, on any number of processes. For every rank
    to take the same number, the epoch's last (n_batches - start) mod world_size batches are
    dropped: fewer than world_size of a shuffled epoch, other ones each epoch, none alone."""
    end = n_batches - (n_batches - start) % world_size
    return [range(first, min(first + batches_per_step, end)) for first in range(start, end, batches_per_step)]


def gradient_sync(model, last_micro_batch: bool):
    """DDP all-reduces gradients in the backward pass of a step's last micro-batch only: the
    others (forward and backward) run under no_sync and just accumulate."""
    if last_micro_batch or not isinstance(model, DDP):
        return nullcontext()
    return model.no_sync()


def average_gradients(module: torch.nn.Module, world: World) -> None:
    """Average a module's gradients over the ranks, as DDP does for the student's."""
    if world.size > 1:
        for p in module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world.size


def seed_dropout(seed: int, step: int, world: World) -> None:
    """Seed this rank's dropout from (seed, step, rank): ranks must not draw the same masks, and a
    job resumed at `step` re-derives them, on any number of processes."""
    digest = hashlib.blake2b(f"dropout:{seed}:{step}:{world.rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


def run_as_rank(world: World, job, *job_args):
    """job(*job_args) in this process. Under torchrun: only rank 0 prints to stdout (the others'
    stdout goes nowhere; their stderr is kept), an error on any rank ends this rank at once
    (fail_fast), and a normal end leaves the process group."""
    if world.size == 1:
        return job(*job_args)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(sys.stdout if world.is_main else devnull):
            result = job(*job_args)
    except SystemExit:  # a stop that every rank agreed on (a signal): all of them are here
        dist.destroy_process_group()
        raise
    except BaseException as err:
        fail_fast(err, world)
    dist.destroy_process_group()
    return result


def broadcast_from_main(obj, world: World):
    """Rank 0's obj (any picklable value), on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj, world: World) -> list:
    """On rank 0, every rank's obj in rank order, Nones left out; [] on the other ranks."""
    if world.size == 1:
        return [] if obj is None else [obj]
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return [o for o in gathered if o is not None] if world.is_main else []


def fail_fast(err: BaseException, world: World) -> NoReturn:
    """Report an error raised on this rank as cli.run would, and exit at once, non-zero. The other
    ranks may be blocked in a collective waiting for this one; tearing the process group down
    could block with them, while an exit is seen at once: torchrun stops the other ranks, and
    gloo peers' collectives fail."""
    if isinstance(err, cli.USER_ERRORS):
        print(f"error: {err} (rank {world.rank})", file=sys.stderr)
        code = 2
    elif isinstance(err, KeyboardInterrupt):
        print(f"interrupted (rank {world.rank})", file=sys.stderr)
        code = 130
    else:
        traceback.print_exception(err)
        print(f"rank {world.rank} failed; exiting so that the job stops", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, epoch, index), every mask of (seed, variant, sequence)
# --------------------------------------------------------------------------------------------

def load_sequences(args) -> tuple[list[str], list[str]]:
    """The training and validation sequences of --data_path."""
    splits = data.load_splits(args.data_path, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction, seed=args.seed)
    train_seqs = [p.sequence for p in splits["train"]]
    val_seqs = [p.sequence for p in splits["val"]]
    if not train_seqs or not val_seqs:
        raise UserError(f"{args.data_path}: need training and validation sequences "
                        f"(got {len(train_seqs)} and {len(val_seqs)})")
    return train_seqs, val_seqs


def teacher_in_loss(args) -> bool:
    """Whether training reads the teacher; plain masked-LM training needs it for evaluation only."""
    return args.distill_weight > 0 or args.hidden_weight > 0


def mask_variant(epoch: int, args) -> int:
    """The training masks of an epoch: one of K when a teacher cache serves the training loss,
    otherwise fresh ones each epoch (masked-LM training with a cache reads only its validation part)."""
    return epoch % args.mask_variants if args.teacher_cache and teacher_in_loss(args) else epoch


class MaskedBatches(Dataset):
    """The batches of one epoch, (seed, epoch) deciding which sequences go together; each
    sequence is cropped and masked by its own generator, seeded by (seed, mask variant, its
    index), so it looks the same in any batch, on any worker, after a resume. The mask variant
    is `mask_variant` (default: the epoch) in training, data.VALIDATION_VARIANT otherwise."""

    def __init__(self, sequences, tokenizer, args, epoch: int, train: bool, mask_variant: int | None = None):
        self.sequences, self.tokenizer, self.epoch, self.train = sequences, tokenizer, epoch, train
        self.max_seq_len, self.mask_prob, self.seed = args.max_seq_len, args.mask_prob, args.seed
        self.mask_variant = (epoch if mask_variant is None else mask_variant) if train else data.VALIDATION_VARIANT
        lengths = data.token_lengths(sequences, self.max_seq_len)
        self.batches = data.batch_indices(lengths, max_tokens=args.max_tokens,
                                          batch_size=None if args.max_tokens else args.batch_size,
                                          shuffle=train, seed=args.seed, epoch=epoch)
        self.padding_efficiency = data.padding_efficiency(self.batches, lengths)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return data.masked_batch(self.sequences, self.batches[i], self.tokenizer, self.max_seq_len,
                                 self.mask_prob, self.seed, self.mask_variant)


def batch_loader(dataset: MaskedBatches, batch_numbers, num_workers: int) -> DataLoader:
    """Batches `batch_numbers` of the dataset, in that order, built by num_workers processes."""
    # An explicit generator keeps the DataLoader from drawing on the global RNG, which dropout
    # uses: otherwise a resumed run would see different dropout masks.
    return DataLoader(dataset, batch_size=None, sampler=batch_numbers,
                      num_workers=num_workers, generator=torch.Generator(),
                      persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Teacher: live, or cached
# --------------------------------------------------------------------------------------------

def fit_max_seq_len(args, max_positions: int) -> None:
    """Lower --max_seq_len to what the teacher's position embeddings allow."""
    if args.max_seq_len > max_positions:
        print(f"note: the teacher takes at most {max_positions} positions; "
              f"--max_seq_len {args.max_seq_len} lowered to {max_positions}")
        args.max_seq_len = max_positions


def load_teacher_targets(args, train_seqs, val_seqs, device, half: bool, variants,
                         hidden_states: bool = False, fill_cache: bool = True) -> TeacherTargets:
    """Where this run's teacher outputs come from (with the last hidden states if asked). With
    --teacher_cache holding every mask variant in `variants`, the teacher is not loaded at all;
    otherwise it is, and with a cache the variants it lacks are written there as it computes them
    (unless not `fill_cache`: then a cache that lacks any is refused)."""
    cache = None
    if args.teacher_cache:
        cache = TeacherCache(args.teacher_cache)
        if cache.teacher is not None:
            fit_max_seq_len(args, cache.teacher["max_positions"])
        fingerprint = data_hash(train_seqs, val_seqs)
        cache.check(run_settings(args, fingerprint))
        if cache.serves(variants):
            print(f"teacher: {cache.teacher['name']} not loaded: its outputs for every mask variant of this run "
                  f"are in the teacher cache {args.teacher_cache}")
            return TeacherTargets(None, cache, cache.tokenizer, cache.teacher)
        if not fill_cache:
            missing = ", ".join("val" if v == data.VALIDATION_VARIANT else f"train{v}"
                                for v in sorted(variants) if not cache.is_complete(v))
            raise UserError(f"teacher cache {args.teacher_cache} lacks mask variants {missing}, and a run of several "
                            "processes does not fill a cache: fill it first with `torchrun --nproc_per_node N "
                            "cache_teacher.py` and the same data, teacher and masking flags, or train without "
                            "--teacher_cache")

    from teacher import load_teacher  # transformers' models are heavy: import them only when needed
    teacher = load_teacher(args.teacher_model, device=device, use_8bit=args.use_8bit, half=half,
                           trust_remote_code=args.trust_remote_code)
    print(f"teacher: {teacher.name} ({teacher.num_parameters / 1e6:.1f}M parameters, {teacher.backend}, "
          f"{teacher.device})")
    fit_max_seq_len(args, teacher.max_positions)
    if cache is not None:
        cache.start_filling(teacher, run_settings(args, fingerprint), train_seqs, val_seqs)
        print(f"teacher cache {args.teacher_cache}: the live teacher fills the mask variants it lacks")
    return TeacherTargets(teacher, cache, teacher.tokenizer, describe_teacher(teacher),
                          output_hidden_states=hidden_states)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, labels, attention_mask, *, temperature,
                      distill_weight, task_weight, distill_positions="masked",
                      student_hidden=None, teacher_hidden=None, hidden_weight=0.0):
    """Weighted KD + MLM (+ hidden cosine) loss; each term averaged per token it covers.

    kl  = T^2 * mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), at temperature T
    ce  = mean over masked positions of -log p_s(true residue)
    cos = mean over non-pad positions of 1 - cos(student_hidden, teacher_hidden)
    Returns a dict of 0-d tensors: loss, kl, ce, cos. teacher_logits None (masked-LM only): kl = 0.
    """
    masked = labels != -100
    kl = torch.zeros((), device=student_logits.device)
    if teacher_logits is not None:  # None: plain masked-LM training, no teacher in the loss
        kl_positions = data.kl_positions(labels, attention_mask, distill_positions)
        log_p_s = F.log_softmax(student_logits[kl_positions].float() / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits[kl_positions].float() / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(student_logits[masked].float(), labels[masked])
    loss = distill_weight * kl + task_weight * ce
    cos = torch.zeros((), device=student_logits.device)
    if hidden_weight > 0:
        real = attention_mask.bool()
        cos = (1 - F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1)).mean()
        loss = loss + hidden_weight * cos
    return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), "cos": cos.detach()}


def masked_metrics(student_logits, teacher_logits, labels) -> dict:
    """Counts at masked positions: student/teacher correct, agreement, number of positions.
    Without teacher logits the teacher counts are 0."""
    masked = labels != -100
    s_pred = student_logits[masked].argmax(-1)
    truth = labels[masked]
    counts = {"n": int(masked.sum()), "student_correct": int((s_pred == truth).sum()),
              "teacher_correct": 0, "agree": 0}
    if teacher_logits is not None:
        t_pred = teacher_logits[masked].argmax(-1)
        counts.update(teacher_correct=int((t_pred == truth).sum()), agree=int((s_pred == t_pred).sum()))
    return counts


def add_to_window(window: dict, batch: dict, counts: dict, terms: dict) -> None:
    """Add one micro-batch to the running sums behind the next metrics.jsonl train record."""
    window["tokens"] += int(batch["attention_mask"].sum())
    window["seqs"] += batch["input_ids"].shape[0]
    window["masked"] += counts["n"]
    window["correct"] += counts["student_correct"]
    window["agree"] += counts["agree"]
    for k in ("loss", "kl", "ce", "cos"):
        window[k] += float(terms[k].detach()) * counts["n"]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(student, hidden_proj, teacher_outputs, val_set: MaskedBatches, args, device, autocast_dtype,
             world: World = World()) -> dict:
    """Loss terms, masked accuracy (student and teacher), top-1 agreement with the teacher and
    perplexity on the validation split with fixed masks. `teacher_outputs(i, batch)` returns the
    teacher's (logits, last hidden states) for validation batch i. Each rank evaluates every
    world.size-th batch; the sums are all-reduced, so that every rank returns the same metrics."""
    was_training = student.training
    student.eval()
    sums = dict.fromkeys(["loss", "kl", "ce", "cos", "n", "student_correct", "teacher_correct", "agree"], 0.0)
    for i in range(world.rank, len(val_set), world.size):
        batch = {k: v.to(device) for k, v in val_set[i].items()}
        with autocast(device, autocast_dtype):
            out = student(batch["input_ids"], batch["attention_mask"], output_hidden_states=hidden_proj is not None)
        t_logits, t_hidden = teacher_outputs(i, batch)
        terms = loss_terms(out, hidden_proj, t_logits, t_hidden, batch, args, distill_positions="masked")
        counts = masked_metrics(out["logits"], t_logits, batch["labels"])
        for k in ("loss", "kl", "ce", "cos"):
            sums[k] += float(terms[k]) * counts["n"]
        for k in ("n", "student_correct", "teacher_correct", "agree"):
            sums[k] += counts[k]
    student.train(was_training)
    sums = dict(zip(sums, all_reduce(list(sums.values()), world)))
    n = max(sums["n"], 1)
    metrics = {k: sums[k] / n for k in ("loss", "kl", "ce", "cos")}
    metrics.update(masked_acc=sums["student_correct"] / n, teacher_masked_acc=sums["teacher_correct"] / n,
                   agreement=sums["agree"] / n, perplexity=math.exp(min(metrics["ce"], 50.0)),
                   masked_tokens=int(sums["n"]))
    return metrics


def loss_terms(student_out, hidden_proj, t_logits, t_hidden, batch, args, distill_positions):
    """distillation_loss with this run's weights, projecting the student's hidden states if used."""
    s_hidden = hidden_proj(student_out["hidden_states"][-1]) if hidden_proj is not None else None
    return distillation_loss(student_out["logits"], t_logits, batch["labels"], batch["attention_mask"],
                             temperature=args.temperature, distill_weight=args.distill_weight,
                             task_weight=args.task_weight, distill_positions=distill_positions,
                             student_hidden=s_hidden, teacher_hidden=t_hidden,
                             hidden_weight=args.hidden_weight)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint-STEP folders, oldest first (a folder being written is named .tmp)."""
    found = [p for p in output_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / TRAINING_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(output_dir: Path, student, hidden_proj, optimizer, scheduler, scaler, position: dict,
                    metadata: dict, keep_last: int) -> Path:
    """Write checkpoint-STEP/ (student + everything needed to continue exactly) atomically:
    into a hidden temporary folder first, renamed only once complete."""
    final = output_dir / f"checkpoint-{position['step']}"
    tmp = output_dir / f".checkpoint-{position['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(student, tmp, metadata)
    state = {"position": position, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "hidden_proj": hidden_proj.state_dict() if hidden_proj else None,
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with open(tmp / TRAINING_STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again: move the old copy aside, never delete it first
        discard(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last else []:
        discard(old)
    return final


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a checkpoint-STEP/ that looks
    complete: renamed to a hidden name first (one atomic step), then removed."""
    hidden = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> None:
    """Folders a killed run left half-written (.checkpoint-N.tmp) or half-deleted (.checkpoint-N.old)."""
    for leftover in [*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".checkpoint-*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            print(f"--resume auto: no checkpoint in {output_dir}; starting fresh")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE).exists():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {TRAINING_STATE})")
    return path


def check_output_dir(args) -> Path:
    """Refuse to mix two runs in one folder unless --resume or --overwrite says so. Only checks:
    nothing is created or deleted until the data and teacher have loaded (start_output_dir)."""
    output_dir = cli.writable_folder(args.output_dir, "--output_dir")
    if holds_run(output_dir) and not args.resume and not args.overwrite:
        raise UserError(f"{output_dir} already holds a training run; pass --resume auto to continue it, "
                        "--overwrite to replace it, or another --output_dir")
    return output_dir


def holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and ((output_dir / "metrics.jsonl").exists() or bool(list_checkpoints(output_dir)))


def start_output_dir(output_dir: Path, args, resumed_step: int | None) -> None:
    """Create the folder; with --overwrite clear the earlier run; on resume drop the metrics
    records written after the checkpoint, which the resumed run writes again."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if resumed_step is None and args.overwrite and holds_run(output_dir):
        metrics.unlink(missing_ok=True)
        for old in list_checkpoints(output_dir):
            discard(old)
    elif resumed_step is not None and metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        if kept != lines:
            with atomic_open(metrics, "w") as f:
                f.writelines(kept)


# --------------------------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------------------------

def start_wandb(args, config: dict):
    """A W&B run, or None (with one warning) when wandb is missing or not logged in."""
    try:
        import wandb
    except ImportError:
        warnings.warn("--use_wandb: wandb is not installed; continuing without W&B", stacklevel=2)
        return None
    # The mode as wandb.init will see it (environment and settings files); login() without a
    # prompt or verification only looks for stored credentials, so this needs no network.
    offline = wandb.setup().settings.mode in ("offline", "dryrun", "disabled")
    if not offline and not wandb.login(prompt=False, verify=False):
        warnings.warn("--use_wandb: not logged in to W&B (run `python setup_wandb.py`, or set "
                      "WANDB_MODE=offline); continuing without W&B", stacklevel=2)
        return None
    try:
        return wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=config,
                          dir=str(args.output_dir))
    except Exception as err:  # network, auth: training must not die for monitoring
        warnings.warn(f"--use_wandb: could not start a W&B run ({err}); continuing without W&B", stacklevel=2)
        return None


def plot_training_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("loss", "total"), ("kl", "KL (x T²)"), ("ce", "masked CE"), ("cos", "hidden cosine")):
        if train and any(r[key] for r in train):
            ax_loss.plot([r["step"] for r in train], [r[key] for r in train], label=f"train {label}", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val total", color="black")
        ax_acc.plot([r["step"] for r in val], [r["masked_acc"] for r in val], "o-", label="student masked acc")
        ax_acc.plot([r["step"] for r in val], [r["agreement"] for r in val], "s-", label="agreement with teacher")
        ax_acc.axhline(val[-1]["teacher_masked_acc"], ls="--", color="grey",
                       label=f"teacher masked acc ({val[-1]['teacher_masked_acc']:.3f})")
        ax_acc.set_ylim(0, 1)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Training and validation loss")
    ax_acc.set(xlabel="optimizer step", ylabel="fraction of masked residues", title="Validation (fixed masks)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def adamw_param_groups(modules, weight_decay: float):
    """Decay matrices only; biases, LayerNorm and embedding-free 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def budget_schedule(optimizer, warmup_steps: int, kind: str, budget_fraction) -> torch.optim.lr_scheduler.LambdaLR:
    """--max_time's schedule: linear warmup over steps, then linear (or cosine) decay to 0 as
    budget_fraction(step) -- the share of the budget used -- goes from 0 to 1."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        used = min(max(budget_fraction(step), 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * used)) if kind == "cosine" else 1.0 - used
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps, so a killed job writes a
    checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # torchrun follows the terminal's Ctrl-C with a SIGTERM: the stop is under way
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def planned_steps(n_batches: int, position: dict, batches_per_step: int, world_size: int, num_epochs: int) -> int:
    """Optimizer steps of the whole run: an epoch's x --num_epochs. A run resumed with another
    global batch (processes x accumulation) than its checkpoint's counts the steps left from the
    checkpoint's position instead, so that it still ends after --num_epochs."""
    if position.get("batches_per_step", batches_per_step) == batches_per_step:
        return num_epochs * len(optimizer_steps(n_batches, 0, batches_per_step, world_size))
    return position["step"] + sum(
        len(optimizer_steps(n_batches, position["batch"] if epoch == position["epoch"] else 0, batches_per_step,
                            world_size)) for epoch in range(position["epoch"], num_epochs))


def train(args) -> dict | None:
    """Run a distillation in this process, alone or as one rank of a torchrun job. Returns the
    summary (also written to output_dir/summary.json); None on ranks other than 0."""
    validate_args(args)
    world, device = join_world(resolve_device(args.device), args.dist_timeout)
    return run_as_rank(world, training_run, args, world, device)


def training_run(args, world: World, device: torch.device) -> dict | None:
    """The training run of train(), on this process's device and share of the data."""
    output_dir = check_output_dir(args)
    resume_from = resolve_resume(args.resume, output_dir)
    autocast_dtype = resolve_precision(args, device)

    train_seqs, val_seqs = load_sequences(args)
    variants = {data.VALIDATION_VARIANT} | ({mask_variant(e, args) for e in range(args.num_epochs)}
                                            if teacher_in_loss(args) else set())
    targets = load_teacher_targets(args, train_seqs, val_seqs, device, variants=variants,
                                   half=autocast_dtype is not None and device.type == "cuda",
                                   hidden_states=args.hidden_weight > 0, fill_cache=world.size == 1)
    tokenizer, about = targets.tokenizer, targets.about
    if args.teacher_cache and args.num_epochs < args.mask_variants:
        print(f"note: {args.num_epochs} epochs use {args.num_epochs} of the --mask_variants {args.mask_variants} "
              "mask variants; a longer run fills the others")

    torch.manual_seed(args.seed)
    config = StudentConfig.from_tokenizer(tokenizer, d_model=args.d_model, num_heads=args.num_heads,
                                          num_layers=args.num_layers, d_ff=args.d_ff, dropout=args.dropout)
    student = Student(config).to(device)
    hidden_proj = (torch.nn.Linear(args.d_model, about["hidden_size"]).to(device)
                   if args.hidden_weight > 0 else None)
    trainable = [student] + ([hidden_proj] if hidden_proj is not None else [])
    print(f"student: {student.summary()}; compression {about['num_parameters'] / student.num_parameters():.1f}x")

    def train_batches(epoch: int) -> MaskedBatches:
        return MaskedBatches(train_seqs, tokenizer, args, epoch, train=True, mask_variant=mask_variant(epoch, args))

    first_epoch = train_batches(0)
    val_set = MaskedBatches(val_seqs, tokenizer, args, epoch=0, train=False)
    if len(first_epoch) < world.size:
        raise UserError(f"the training split makes {len(first_epoch)} batches, too few for {world.size} processes: "
                        "lower --batch_size (or --max_tokens), or start fewer processes")
    # An optimizer step takes one micro-batch per rank per accumulation step: the global batch.
    batches_per_step = world.size * args.grad_accumulation_steps
    position = {"step": 0, "epoch": 0, "batch": 0, "best_val_loss": math.inf, "elapsed_s": 0.0,
                "batches_per_step": batches_per_step}  # "batch": the epoch's next batch, counted over all ranks
    if resume_from is not None:
        weights, state = read_checkpoint(resume_from, config)
        position = dict(state["position"])
    total_steps = planned_steps(len(first_epoch), position, batches_per_step, world.size, args.num_epochs)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    budget = f"; at most {args.max_time:g} min" if args.max_time else ""
    ranks = f" ({world.size} processes x {args.grad_accumulation_steps})" if world.size > 1 else ""
    print(f"data: {len(train_seqs)} train / {len(val_seqs)} val sequences, {len(first_epoch)} batches per "
          f"epoch, padding efficiency {first_epoch.padding_efficiency:.3f}; {batches_per_step} batches{ranks} per "
          f"optimizer step, {total_steps} optimizer steps{budget}")

    start_time = time.perf_counter()  # moved back by the elapsed time of a resumed run, below
    # fused: one kernel for the whole update instead of one per parameter (2-3x faster step on CPU)
    optimizer = torch.optim.AdamW(adamw_param_groups(trainable, args.weight_decay), lr=args.learning_rate,
                                  fused=device.type in ("cpu", "cuda"))
    if args.max_time:
        budget_s = args.max_time * 60
        # The share of the wall-clock budget, or of the steps where --max_steps (or --num_epochs)
        # ends the run first: the learning rate reaches 0 at whichever limit stops it.
        scheduler = budget_schedule(optimizer, args.warmup_steps, args.scheduler,
                                    lambda step: max(position["elapsed_s"] / budget_s, step / total_steps))
    else:
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
        make_schedule = get_cosine_schedule_with_warmup if args.scheduler == "cosine" else get_linear_schedule_with_warmup
        scheduler = make_schedule(optimizer, min(args.warmup_steps, total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    if resume_from is not None:
        restore_training_state(resume_from, weights, state, student, hidden_proj, optimizer, scheduler, scaler)
        print(f"resumed from {resume_from} at step {position['step']} (epoch {position['epoch']}, "
              f"batch {position['batch']})")
        if position.get("batches_per_step", batches_per_step) != batches_per_step:
            print(f"note: the checkpoint was written with {position['batches_per_step']} batches per optimizer step, "
                  f"this run takes {batches_per_step}: the schedule is planned anew for the steps left")
        position["batches_per_step"] = batches_per_step
    # The teacher stays as it is on every rank: frozen, never wrapped. The student's only buffers
    # are RoPE tables that each rank grows to its longest sequence: not broadcast.
    ddp_student = student if world.size == 1 else DDP(
        student, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    if world.size > 1:
        seed_dropout(args.seed, position["step"], world)
    barrier(world)  # every rank has read the output folder and checkpoint before rank 0 changes them
    if world.is_main:
        start_output_dir(output_dir, args, position["step"] if resume_from is not None else None)
    start_time -= position["elapsed_s"]
    reads_teacher = teacher_in_loss(args)  # else plain masked LM: the teacher serves evaluation only
    metadata = {"teacher": about["name"], "teacher_vocab_hash": tokenizer.vocab_hash,
                "max_seq_len": args.max_seq_len, "distill_args": {k: v for k, v in vars(args).items()}}

    # Teacher outputs on the fixed validation masks never change: get them once.
    val_teacher_outputs_by_batch = {}

    def val_teacher_outputs(i, batch):
        if i not in val_teacher_outputs_by_batch:
            t = targets(batch, data.VALIDATION_VARIANT)
            val_teacher_outputs_by_batch[i] = (t["logits"], t.get("hidden_states"))
        return val_teacher_outputs_by_batch[i]

    run_config = {**vars(args), "student_parameters": student.num_parameters(), "processes": world.size,
                  "teacher_parameters": about["num_parameters"], "teacher_backend": about["backend"]}
    wandb_run = start_wandb(args, run_config) if args.use_wandb and world.is_main else None
    metrics_path = output_dir / "metrics.jsonl"
    metrics_file = open(metrics_path if world.is_main else os.devnull, "a")  # other ranks log to nowhere

    def log(record: dict):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if wandb_run is not None:
            wandb_run.log({f"{record['split']}/{k}": v for k, v in record.items() if k != "split"},
                          step=record["step"])

    def run_eval(step: int) -> dict:
        metrics = evaluate(student, hidden_proj, val_teacher_outputs, val_set, args, device, autocast_dtype, world)
        log({"split": "val", "step": step, "epoch": position["epoch"], **metrics})
        if metrics["loss"] < position["best_val_loss"]:
            position["best_val_loss"] = metrics["loss"]
            if world.is_main:
                save_student(student, output_dir / "best_model", {**metadata, "step": step, "val": metrics})
        return metrics

    def checkpoint() -> Path:
        """Rank 0 writes checkpoint-STEP/ (unless this run saved this very step already); the other
        ranks wait for it."""
        path = output_dir / f"checkpoint-{position['step']}"
        saved_already = saved_steps and saved_steps[-1] == position["step"] and path in list_checkpoints(output_dir)
        if world.is_main and not saved_already:
            saved_steps.append(position["step"])
            if targets.cache is not None:  # the cache entries written so far survive with the checkpoint
                targets.cache.flush()
            save_checkpoint(output_dir, student, hidden_proj, optimizer, scheduler, scaler, dict(position),
                            {**metadata, "step": position["step"]}, args.keep_last)
        barrier(world)  # no rank goes on, or exits, before the checkpoint is complete
        return path

    from tqdm.auto import tqdm
    step = position["step"]
    saved_steps = []
    window = dict.fromkeys(WINDOW_SUMS, 0) | {"t0": time.perf_counter()}
    bad_steps, last_eval, stopped_by = 0, None, None
    if step == 0:  # the starting point of the curves: how far the untrained student is from the teacher
        last_eval = (0, run_eval(0))
    bar = tqdm(total=None if args.max_time else total_steps, initial=step, desc="distill", unit="step",
               dynamic_ncols=True, disable=not world.is_main)
    stop_signum, out_of_time = 0, False  # agreed on by all ranks at every step
    student.train()
    with StopRequest() as stop:
        for epoch in range(position["epoch"], args.num_epochs):
            if step >= total_steps or stop_signum or out_of_time:
                break
            position["epoch"] = epoch
            epoch_set = first_epoch if epoch == 0 else train_batches(epoch)
            steps = optimizer_steps(len(epoch_set), position["batch"], batches_per_step, world.size)
            mine = [group[world.rank::world.size] for group in steps]  # this rank's batches of each step
            micro_batches = iter(batch_loader(epoch_set, [i for part in mine for i in part], args.num_workers))
            optimizer.zero_grad(set_to_none=True)
            for group, part in zip(steps, mine):
                loss_ok = True
                for j, batch in enumerate(islice(micro_batches, len(part))):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    t = targets(batch, epoch_set.mask_variant) if reads_teacher else {"logits": None}
                    with gradient_sync(ddp_student, last_micro_batch=j == len(part) - 1):
                        with autocast(device, autocast_dtype):
                            out = ddp_student(batch["input_ids"], batch["attention_mask"],
                                              output_hidden_states=hidden_proj is not None)
                            terms = loss_terms(out, hidden_proj, t["logits"], t.get("hidden_states"), batch, args,
                                               distill_positions=args.distill_positions)
                        # A non-finite loss goes backward too, to be dropped below with its step:
                        # under DDP every rank must take part in the gradient all-reduce.
                        scaler.scale(terms["loss"] / len(part)).backward()
                    loss_ok = loss_ok and bool(torch.isfinite(terms["loss"]))
                    add_to_window(window, batch, masked_metrics(out["logits"].detach(), t["logits"], batch["labels"]),
                                  terms)

                position["batch"] = group.stop
                # One all-reduce a step has every rank decide alike: skip the step if any rank's loss
                # is not finite, stop if any rank got a signal, and run the budget on one clock.
                bad, stop_signum, position["elapsed_s"] = all_reduce(
                    [not loss_ok, stop.signum or 0, time.perf_counter() - start_time], world, op="max")
                stop_signum = int(stop_signum)
                out_of_time = bool(args.max_time) and position["elapsed_s"] >= budget_s
                if bad:  # skip the step: a non-finite loss would poison the weights
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps += 1
                    if world.is_main:
                        warnings.warn(f"non-finite loss at step {step + 1}; step skipped ({bad_steps} in a row)",
                                      stacklevel=1)
                    if bad_steps >= args.max_bad_steps:
                        stopped_by = "non-finite losses"
                        break
                    continue
                bad_steps = 0
                if hidden_proj is not None:
                    average_gradients(hidden_proj, world)
                if args.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for m in trainable for p in m.parameters()],
                                                   args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                position["step"] = step
                bar.update(1)

                if step % args.log_every == 0 or step == total_steps:
                    dt = max(time.perf_counter() - window["t0"], 1e-9)
                    sums = dict(zip(WINDOW_SUMS, all_reduce([window[k] for k in WINDOW_SUMS], world)))
                    m = max(sums["masked"], 1)
                    record = {"split": "train", "step": step, "epoch": epoch,
                              **{k: sums[k] / m for k in ("loss", "kl", "ce", "cos")},
                              "masked_acc": sums["correct"] / m,
                              "agreement": sums["agree"] / m if reads_teacher else None,
                              "lr": scheduler.get_last_lr()[0], "tokens_per_s": sums["tokens"] / dt,
                              "sequences_per_s": sums["seqs"] / dt, "elapsed_s": position["elapsed_s"]}
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['masked_acc']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    window = dict.fromkeys(WINDOW_SUMS, 0) | {"t0": time.perf_counter()}
                if step % args.eval_every == 0:
                    last_eval = (step, run_eval(step))
                if step % args.save_every == 0:
                    checkpoint()
                if step >= total_steps or stop_signum or out_of_time:
                    break
            if stopped_by or stop_signum or step >= total_steps or out_of_time:
                break
            position["epoch"], position["batch"] = epoch + 1, 0
            if last_eval is None or last_eval[0] != step:
                last_eval = (step, run_eval(step))
        bar.close()

        if stop_signum:
            path = checkpoint()
            metrics_file.close()
            launcher = "torchrun <same launcher arguments> distill.py" if world.size > 1 else "python distill.py"
            if world.is_main:
                print(f"stopped by {signal.Signals(stop_signum).name} at step {step}; checkpoint {path}\n"
                      f"resume with: {launcher} <same arguments> --resume auto", file=sys.stderr)
            sys.exit(128 + stop_signum)
    if stopped_by:
        metrics_file.close()
        if targets.cache is not None:
            targets.cache.flush()
        raise UserError(f"{args.max_bad_steps} non-finite losses in a row at step {step}: stopping. The last good "
                        f"checkpoint is kept in {output_dir}; try a lower --learning_rate or fp32")

    final_metrics = last_eval[1] if last_eval and last_eval[0] == step else run_eval(step)
    final_checkpoint = checkpoint()
    metrics_file.close()
    if targets.cache is not None:
        targets.cache.close()
    teacher_batches = dict(zip(targets.batches, map(int, all_reduce(list(targets.batches.values()), world))))
    if not world.is_main:
        return None
    plot_training_curves(metrics_path, output_dir / "training_curves.png")
    elapsed = time.perf_counter() - start_time
    best = json.loads((output_dir / "best_model" / "config.json").read_text()).get("metadata", {})
    summary = {"teacher": about["name"], "teacher_backend": about["backend"], "device": str(device),
               "processes": world.size, "batches_per_step": batches_per_step,
               "precision": str(autocast_dtype or torch.float32).replace("torch.", ""),
               "student_parameters": student.num_parameters(), "teacher_parameters": about["num_parameters"],
               "compression": about["num_parameters"] / student.num_parameters(),
               "teacher_cache": args.teacher_cache, "teacher_loaded": targets.teacher is not None,
               "teacher_batches": teacher_batches,
               "steps": step, "elapsed_s": elapsed, "final_val": final_metrics,
               "best_val": best.get("val"), "best_step": best.get("step"),
               "padding_efficiency": first_epoch.padding_efficiency,
               "best_model": str(output_dir / "best_model" / "model.pt"),
               "last_checkpoint": str(final_checkpoint), "args": vars(args)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if wandb_run is not None:
        wandb_run.summary.update({"final_val/" + k: v for k, v in final_metrics.items()})
        wandb_run.finish()
    print(f"done: {step} steps in {elapsed / 60:.1f} min; val masked acc {final_metrics['masked_acc']:.3f} "
          f"(teacher {final_metrics['teacher_masked_acc']:.3f}), agreement {final_metrics['agreement']:.3f}; "
          f"best model {output_dir / 'best_model' / 'model.pt'}")
    return summary


def read_checkpoint(path: Path, config: StudentConfig) -> tuple[dict, dict]:
    """(student weights, training state) of checkpoint-STEP/, refused unless it holds this run's student."""
    saved = load_student(path, map_location="cpu")
    if saved.model.config != config:
        raise UserError(f"{path} holds a different student ({saved.model.summary()}); pass the same sizes "
                        "and teacher as the run that wrote it")
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that would run code
        raise CheckpointError(f"{path / TRAINING_STATE}: unreadable or unsafe training state "
                              f"({str(err).strip().splitlines()[0]}); resume from an earlier checkpoint") from err
    return saved.model.state_dict(), state


def restore_training_state(path: Path, weights: dict, state: dict, student, hidden_proj, optimizer, scheduler,
                           scaler) -> None:
    """Load what read_checkpoint read: weights, optimizer, scheduler, scaler and the RNGs (of the
    process, or rank 0, that wrote it)."""
    student.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if hidden_proj is not None:
        if state["hidden_proj"] is None:
            raise UserError(f"{path} was trained without --hidden_weight; resume with the same loss flags")
        hidden_proj.load_state_dict(state["hidden_proj"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def main(argv=None):
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    cli.run(main)
