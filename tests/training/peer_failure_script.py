"""Run by test_distributed under torchrun: rank 0 dies at once, rank 1 is in an
all_reduce; rank 1 reports what thrifty.training.torchrun_errors makes of the real
gloo error it gets."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from thrifty.training import torchrun_errors

dist.init_process_group("gloo")
if dist.get_rank() == 0:
    os._exit(2)
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as error:
    print(f"classified: {torchrun_errors.another_rank_failed(error)}", flush=True)
    print(torchrun_errors.peer_failure_line(), flush=True)
