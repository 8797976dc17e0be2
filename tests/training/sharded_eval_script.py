"""Run under torchrun by test_distributed.py: a model sharded with FSDP2 alternates
training steps on one batch with no-gradient forwards of the same batch. Each no-gradient
loss must equal the next training step's loss (the same weights, the same batch); this
script prints (rank 0) the largest relative difference each rank saw, as a JSON list.
Usage: sharded_eval_script.py MODEL_DIR STEPS"""

from __future__ import annotations

import json
import sys

import torch

from thrifty import load_model
from thrifty.sft.trainer import sft_loss
from thrifty.training.distributed import Distributed


def main() -> None:
    model_dir, steps = sys.argv[1], int(sys.argv[2])
    dist = Distributed.from_env()
    torch.manual_seed(0)
    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    dist.shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (4, 60))
    batch = {"input_ids": ids, "positions": torch.arange(60).expand(4, 60), "labels": ids.clone()}
    worst, evaluated = 0.0, None
    for _ in range(steps):
        model.train()
        loss, count = sft_loss(model, batch)
        if evaluated is not None:
            worst = max(worst, abs(evaluated - loss.item()) / abs(loss.item()))
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            evaluated = sft_loss(model, batch)[0].item()
    reports = dist.gather({"rank": dist.rank, "worst": worst})
    if dist.is_main:
        print(json.dumps(reports))


if __name__ == "__main__":
    main()
