"""distill.py's command-line arguments, group by group, and their checks: cache_teacher.py and
the benchmarks build theirs from the same groups, so that all read data, teacher and masks alike."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TypeVar

from architecture import StudentConfig
from pepemb import relations
from pepemb.cli import UserError
from pepemb.data import Masking, load_sequences
from pepemb.losses import LossWeights
from pepemb.schedule import Optimization
from pepemb.teacher_targets import TeacherSource

T = TypeVar("T")


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """distill.py's arguments, group by group, in the order --help shows them."""
    add_data_arguments(p)
    add_teacher_arguments(p)
    add_student_arguments(p)
    add_loss_arguments(p)
    add_optimisation_arguments(p)
    add_device_arguments(p, compile=True)
    add_output_arguments(p)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_path",
        required=True,
        help="folder with train/val/test.fasta (download_sample_data.py) or one FASTA file, split deterministically",
    )
    g.add_argument(
        "--max_seq_len",
        type=int,
        default=512,
        help="tokens per sequence incl. start/end; longer ones are cropped "
        "(random window in training, fixed in evaluation)",
    )
    g.add_argument("--batch_size", type=int, default=32, help="sequences per batch (ignored with --max_tokens)")
    g.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="token budget per batch (padded tokens) instead of --batch_size, like ESM's toks_per_batch",
    )
    g.add_argument("--mask_prob", type=float, default=0.15, help="fraction of residues masked (80/10/10)")
    g.add_argument("--val_fraction", type=float, default=0.1, help="validation share when --data_path is one file")
    g.add_argument("--test_fraction", type=float, default=0.1, help="test share when --data_path is one file")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes for batch building")
    g.add_argument("--seed", type=int, default=42, help="seeds the split, data order, masks, init and dropout")


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher and teacher cache")
    g.add_argument(
        "--teacher_model",
        default="Rostlab/prot_bert",
        help="HF masked LM: Hub id, local folder (save_pretrained), or 'antiberty' (offline)",
    )
    g.add_argument(
        "--use_8bit", action="store_true", help="8-bit teacher: bitsandbytes on CUDA, torch dynamic int8 on CPU"
    )
    g.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow a Hub teacher to run its own code (off unless you trust it)",
    )
    g.add_argument(
        "--distill_positions",
        choices=["masked", "all"],
        default="masked",
        help="where the KL term is taken, and what a teacher cache stores: masked positions or every non-pad position",
    )
    g.add_argument(
        "--teacher_cache",
        default=None,
        metavar="DIR",
        help="keep the teacher's logits in DIR (fp16; with a 30-token vocabulary about 9 bytes per "
        "token and mask variant, 60 with --distill_positions all): the first --mask_variants "
        "epochs fill it, later epochs and later runs with the same data, teacher and masking "
        "read it without loading the teacher",
    )
    g.add_argument(
        "--mask_variants",
        type=int,
        default=4,
        help="with --teacher_cache: fixed masks per training sequence (epoch e uses variant e mod K); "
        "more variants mean more mask diversity but more teacher passes and disk",
    )


def add_device_arguments(
    p: argparse.ArgumentParser, *, training: bool = True, precision: bool = True, compile: bool = False
):
    """--device, and --fp16 / --bf16 with `precision`: every script's one declaration of them.
    `training` adds the GradScaler to the help and --dist_timeout (torchrun); `compile`, --compile."""
    g = p.add_argument_group("precision and device")
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where to run (auto: CUDA, else MPS, else CPU)",
    )
    if compile:
        g.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the student (inductor: needs a C++ compiler; the first batches pay the compilation)",
        )
    if precision and training:
        g.add_argument(
            "--fp16",
            action="store_true",
            help="fp16 autocast + GradScaler, fp16 teacher (CUDA; falls back to fp32 on CPU)",
        )
        g.add_argument(
            "--bf16", action="store_true", help="bf16 autocast, fp16 teacher (CUDA; allowed but slow on most CPUs)"
        )
    elif precision:
        g.add_argument("--fp16", action="store_true", help="fp16 autocast (GPU only; fp32 on CPU)")
        g.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only; fp32 on CPU)")
    if not training:
        return g
    g.add_argument(
        "--dist_timeout",
        type=float,
        default=30.0,
        metavar="MINUTES",
        help="under torchrun: how long a process waits for the others at a synchronisation point before the job fails",
    )
    return g


def add_student_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student")
    g.add_argument("--d_model", type=int, default=384, help="hidden size")
    g.add_argument("--num_heads", type=int, default=6, help="attention heads (must divide d_model)")
    g.add_argument("--num_layers", type=int, default=4, help="transformer blocks")
    g.add_argument("--d_ff", type=int, default=None, help="feed-forward size (default 4 x d_model)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the student")
    g.add_argument(
        "--attention_dropout",
        type=float,
        default=None,
        help="dropout of the attention weights (default: --dropout); 0 keeps CPU attention on its fused "
        "kernel, about 1.5x faster steps (docs/results.md)",
    )


def add_loss_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loss")
    g.add_argument(
        "--distill_weight",
        type=float,
        default=0.9,
        help="weight of the KL term (docs/results.md: What distillation buys)",
    )
    g.add_argument("--task_weight", type=float, default=0.1, help="weight of the masked-LM cross-entropy")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KL term")
    g.add_argument(
        "--hidden_weight",
        type=float,
        default=0.0,
        help="weight of a cosine loss between projected student and teacher last hidden states",
    )
    g.add_argument(
        "--embedding_weight",
        type=float,
        default=0.0,
        help="weight of a loss that trains a linear map (saved with the student) from the student's "
        "per-protein embedding to the teacher's (mean last hidden state over residues): squared "
        "error over the teacher embeddings' variance, i.e. 1 - R^2; embed.py --space teacher uses it",
    )
    g.add_argument(
        "--llr_weight",
        type=float,
        default=0.0,
        help="weight of the squared error between student and teacher log-likelihood ratios "
        "log p(a) - log p(wt) over the 20 residues at masked positions (what zero-shot scoring reads); "
        "works from a teacher cache",
    )
    g.add_argument(
        "--relation_weight",
        type=float,
        default=0.0,
        help="weight of MiniLMv2 attention-relation distillation: KL of the q-q, k-k and v-v relations "
        "of one teacher and one student layer (needs the live teacher: no --teacher_cache)",
    )
    g.add_argument(
        "--relation_layers",
        nargs=2,
        type=int,
        default=[-1, -1],
        metavar=("TEACHER", "STUDENT"),
        help="the teacher's and the student's layer whose relations --relation_weight matches (negative: from the last)",
    )
    g.add_argument(
        "--relation_heads",
        type=int,
        default=8,
        help="relation heads of --relation_weight: must divide the student's d_model and the teacher's hidden size",
    )


def add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (AdamW)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--scheduler", choices=["linear", "cosine"], default="linear", help="decay after warmup")
    g.add_argument("--num_epochs", type=int, default=10, help="passes over the training split")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument(
        "--max_time",
        type=float,
        default=None,
        metavar="MINUTES",
        help="train for this wall-clock budget: after warmup the learning rate decays with the "
        "fraction of the budget used (or of --max_steps / --num_epochs, if they end the run "
        "first), and the run ends with an evaluation and a checkpoint",
    )
    g.add_argument("--grad_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="stop after this many non-finite losses in a row (each one is skipped)",
    )


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation, checkpoints, monitoring")
    g.add_argument("--output_dir", default="checkpoints", help="checkpoints, metrics and plots go here")
    g.add_argument("--eval_every", type=int, default=500, help="evaluate every N steps (and at step 0 and the end)")
    g.add_argument("--save_every", type=int, default=1000, help="write checkpoint-STEP/ every N steps")
    g.add_argument("--keep_last", type=int, default=3, help="keep only the newest N checkpoint-STEP folders")
    g.add_argument("--resume", default=None, help="'auto' (newest checkpoint in output_dir) or a checkpoint folder")
    g.add_argument("--overwrite", action="store_true", help="allow an output_dir that holds another run")
    g.add_argument("--log_every", type=int, default=10, help="write a metrics.jsonl record every N steps")
    g.add_argument("--use_wandb", action="store_true", help="also log to Weights & Biases (see setup_wandb.py)")
    g.add_argument("--wandb_project", default="pepemb-distill", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name")


def validate_training_args(args) -> None:
    """The checks of distill.py's own arguments (student, loss, optimisation, output)."""
    positive = [
        "num_epochs",
        "grad_accumulation_steps",
        "eval_every",
        "save_every",
        "log_every",
        "d_model",
        "num_heads",
        "num_layers",
        "max_bad_steps",
    ]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ["max_steps", "d_ff", "max_time"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    for name in [
        "warmup_steps",
        "keep_last",
        "weight_decay",
        "max_grad_norm",
        "distill_weight",
        "task_weight",
        "hidden_weight",
        "embedding_weight",
        "llr_weight",
        "relation_weight",
    ]:
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(args, name)})")
    if args.d_model % args.num_heads:
        raise UserError(f"--num_heads {args.num_heads} does not divide --d_model {args.d_model}")
    if (args.d_model // args.num_heads) % 2:
        raise UserError(f"head size d_model/num_heads = {args.d_model // args.num_heads} must be even for RoPE")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {args.temperature})")
    weights = ("distill_weight", "task_weight", "hidden_weight", "embedding_weight", "llr_weight", "relation_weight")
    if all(getattr(args, name) == 0 for name in weights):
        raise UserError("all loss weights are 0: set --distill_weight and/or --task_weight")
    for name in ("dropout", "attention_dropout"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 1:
            raise UserError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if args.teacher_cache and args.hidden_weight > 0:
        raise UserError("--teacher_cache stores logits only; drop --hidden_weight or the cache")
    if args.teacher_cache and args.relation_weight > 0:
        raise UserError("--relation_weight needs the live teacher's attention projections; drop --teacher_cache")
    if args.relation_weight > 0:
        relation_layers(args)
        try:
            relations.relation_heads_check(args.relation_heads, args.d_model, "--d_model")
        except ValueError as err:
            raise UserError(str(err)) from None


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
        raise UserError(
            f"--max_tokens {args.max_tokens} is smaller than --max_seq_len {args.max_seq_len}: "
            "a full-length sequence would not fit in a batch"
        )
    if not 0 < args.mask_prob < 1:
        raise UserError(f"--mask_prob must be between 0 and 1 (got {args.mask_prob})")
    if args.fp16 and args.bf16:
        raise UserError("choose one of --fp16 and --bf16")
    if args.dist_timeout <= 0:
        raise UserError(f"--dist_timeout must be positive (got {args.dist_timeout})")


def from_args(settings: type[T], args) -> T:
    """The dataclass `settings` filled from the arguments of the same names: each field is a flag."""
    return settings(**{f.name: getattr(args, f.name) for f in fields(settings)})


def masking(args) -> Masking:
    """The data arguments that decide batches and masks."""
    return from_args(Masking, args)


def training_sequences(args) -> tuple[list[str], list[str]]:
    """The training and validation sequences of --data_path."""
    return load_sequences(args.data_path, args.val_fraction, args.test_fraction, args.seed)


def loss_weights(args) -> LossWeights:
    """The loss arguments: each term's weight and the temperature."""
    return from_args(LossWeights, args)


def relation_layers(args) -> tuple[int, int]:
    """--relation_layers TEACHER STUDENT: the two layer indices, the student's checked."""
    teacher, student = args.relation_layers
    if not -args.num_layers <= student < args.num_layers:
        raise UserError(f"--relation_layers: the student has {args.num_layers} layers; {student} is not one of them")
    return teacher, student


def teacher_source(args) -> TeacherSource:
    """The teacher arguments: the model, how it is loaded, and the teacher cache."""
    return from_args(TeacherSource, args)


def optimization(args) -> Optimization:
    """The optimisation arguments the optimizer and its schedule take."""
    return from_args(Optimization, args)


def student_config(args, tokenizer, teacher_hidden_size: int | None = None) -> StudentConfig:
    """The student arguments' model for this tokenizer; with teacher_hidden_size, a map from its
    per-protein embedding to the teacher's of that size."""
    return StudentConfig.from_tokenizer(
        tokenizer,
        d_model=args.d_model,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        d_ff=args.d_ff,
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        teacher_hidden_size=teacher_hidden_size,
    )
