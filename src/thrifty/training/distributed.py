"""More than one process: torchrun, torch.distributed and DDP, as the trainers use them.

    torchrun --nproc-per-node 2 -m thrifty sft CONFIG

torchrun starts one process per rank and tells each its RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE and the rendezvous address in the environment. `Distributed.from_env()`
reads them, joins the process group (gloo on CPU, nccl on CUDA) and gives each process
its share of the machine's cores; without torchrun it is a world of one and every method
below is the identity, so the trainers have one code path.

What the trainers do with it (see sft/trainer.py and grpo/trainer.py):
* every rank holds the same data and draws the same global order from the seed; each
  micro-batch of the global step is split in world_size contiguous slices (`shard`), so N
  ranks x batch B compute what 1 process x batch N*B computes;
* gradients are averaged by DistributedDataParallel (`ddp_forward`), once per optimizer
  step (no_sync on the other micro-batches); the losses are scaled by world_size so that
  average is the sum of per-rank losses normalised over the whole global step;
* sums and per-rank results are exchanged with all_reduce / all_gather_object;
* rank 0 alone writes files and prints; every rank raises its own errors, and torchrun
  stops the other ranks when one exits with an error (a rank whose collective breaks
  first says so in one line: torchrun_errors.py).

With `shard_model` (SFT's fsdp: full_shard) FSDP2 replaces DDP: every decoder layer and
the rest of the model hold 1/N of their weights, gradients and AdamW state per rank as
DTensors, gathered layer by layer for each forward and backward. Checkpoints and the
result stay ordinary full files: `full_tensor` gathers a sharded tensor (every rank
calls it, rank 0 writes) and `shard_like` cuts a loaded full tensor back into this
rank's piece, so a sharded run resumes with any number of processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from thrifty.errors import ThriftyError
from thrifty.training.config import launched_world_size

T = TypeVar("T")


def split_evenly(items: Sequence[T], parts: int) -> list[list[T]]:
    """`items` in `parts` contiguous pieces, as torch.tensor_split (the first len % parts
    pieces one longer)."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(parts)]


class _ModelCall(nn.Module):
    """Wraps the model so DDP sees a forward: `call(fn, *args)` runs fn(model, *args), so a
    trainer's loss function (which reads hidden states and the head's weight directly)
    runs inside DDP's forward and its backward reduces the gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


@dataclass
class Distributed:
    """This process's place in the torchrun world, and the few collective operations the
    trainers need (see the module docstring); in a world of one each is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    _ddp: DistributedDataParallel | None = field(default=None, repr=False)
    _sharded: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls) -> Distributed:
        """The world torchrun launched this process into (a world of one without it);
        joins the process group on first use."""
        world_size = launched_world_size()
        if world_size == 1:
            return cls()
        try:
            rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        except KeyError as missing:
            raise ThriftyError(f"WORLD_SIZE={world_size} is set but {missing} is not: launch with torchrun "
                               "(e.g. torchrun --nproc-per-node 2 -m thrifty sft CONFIG), which sets them all.") from None
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            # Left to the interpreter's exit, gloo's threads can still be running when their
            # objects are destroyed ("terminate called without an active exception", seen in
            # CI): leave the group first.
            atexit.register(_leave_process_group)
            # Each rank's share of the cores: N processes each using every core would fight
            # over them (the native kernels read the same setting, at::get_num_threads).
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // local_world_size))
        return cls(rank, world_size, local_rank, local_world_size)

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded with FSDP2 (shard_model) rather than replicated."""
        return self._sharded

    def shard_model(self, model: nn.Module) -> None:
        """FSDP2 on `model` (a CausalLM): one unit per decoder layer, then the rest
        (embeddings, final norm, a tied head). hidden_states is the trainers' forward."""
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        register_fsdp_forward_method(model, "hidden_states")
        self._sharded = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes files and saves."""
        return self.rank == 0

    # ------------------------------------------------------------------ data

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous piece of `items` (split_evenly); a world of one keeps them all."""
        return split_evenly(items, self.world_size)[self.rank]

    # ------------------------------------------------------------------ collectives

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    # ------------------------------------------------------------------ gradients

    def ddp_forward(self, model: nn.Module, fn: Callable[..., T], *args: Any, sync: bool) -> T:
        """fn(model, *args), through DistributedDataParallel when there are several ranks:
        the backward of the result then averages the gradients over the ranks if `sync`
        (the last micro-batch of an optimizer step) and only accumulates them otherwise."""
        if not self.enabled or self._sharded:  # FSDP2 reduce-scatters the gradients itself
            return fn(model, *args)
        if self._ddp is None or self._ddp.module.model is not model:
            # forward_sync_buffers=False: no buffer changes in training (RoPE tables, quantized
            # weights), so re-sending them every forward would be pure traffic.
            self._ddp = DistributedDataParallel(_ModelCall(model), forward_sync_buffers=False)
        context = contextlib.nullcontext() if sync else self._ddp.no_sync()
        with context:
            return self._ddp(fn, *args)


def _leave_process_group() -> None:
    if dist.is_initialized():
        # A gloo worker thread drops its last reference to a finished collective's tensors
        # after the caller's wait returned, and that needs the GIL; if the interpreter is
        # finalizing by then, the thread dies inside a destructor and the rank aborts
        # ("terminate called without an active exception", seen under FSDP2, whose
        # device mesh keeps the group alive past destroy_process_group). Sleeping
        # releases the GIL so those threads finish first.
        time.sleep(0.1)
        dist.destroy_process_group()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (DTensor) tensor, gathered: every rank must call it. A plain
    tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as `like` is sharded (this rank's piece, no communication); as it is
    when `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
