"""One process, or one rank of a torchrun job: the process group, collectives, how an optimizer
step's batches are shared between ranks, and failing fast when one rank fails."""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pepemb import cli, data
from pepemb.cli import UserError


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


SINGLE_PROCESS = World()  # no torchrun: every collective is a no-op


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
            raise UserError(
                f"local rank {world.local_rank} has no GPU of its own ({torch.cuda.device_count()} on "
                "this machine): pass --nproc_per_node at most the number of GPUs"
            )
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


def rank_steps(dataset, start: int, batches_per_step: int, world: World, num_workers: int):
    """The optimizer steps of an epoch of batches (a data.MaskedBatches) from batch `start` on
    (optimizer_steps), each as (its range of global batch numbers, an iterator over this rank's
    micro-batches of it, how many): one loader, num_workers processes, builds them all in order."""
    steps = optimizer_steps(len(dataset), start, batches_per_step, world.size)
    mine = [group[world.rank :: world.size] for group in steps]  # this rank's batches of each step
    micro_batches = iter(data.batch_loader(dataset, [i for part in mine for i in part], num_workers))
    return [(group, islice(micro_batches, len(part)), len(part)) for group, part in zip(steps, mine)]


def gradient_sync(model, last_micro_batch: bool):
    """DDP all-reduces gradients in the backward pass of a step's last micro-batch only: the
    others (forward and backward) run under no_sync and just accumulate."""
    if last_micro_batch or not isinstance(model, DDP):
        return nullcontext()
    return model.no_sync()


def wrap_ddp(student: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """The student as the forward pass sees it: DistributedDataParallel over several ranks, else
    itself."""
    if world.size == 1:
        return student
    # The student's only buffers are RoPE tables that each rank grows to its longest sequence: not broadcast.
    return DDP(student, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


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
