"""A training script as a user writes one, run by the distributed tests both as a plain
process (`python distributed_script.py SPEC`) and under `torchrun`: the Python API is the
same in both. SPEC is JSON: {"kind": "sft" | "grpo", "model": DIR, "config": {...},
"fail_on_rank": R (optional: that rank's reward function raises at its second call),
"report": true (optional: each rank writes rank{R}.json into output_dir with the bytes of
the parameters and optimizer state it holds)}.
The rows (tiny_tokenizer's) and the reward are fixed here, so both launches use the same
ones; run it with tests/ on PYTHONPATH, as the tests do."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from thrifty import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, load_model
from thrifty.errors import ThriftyError

from tiny_tokenizer import WORDS, tiny_sft_rows

def grpo_rows() -> list[dict]:
    return [{"prompt": f"say {w}", "answer": w} for w in WORDS]


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` held by this process (its shard, for a DTensor)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def write_memory_report(trainer: SFTTrainer, output_dir: str) -> None:
    optimizer = trainer.optimizer
    state = [t for s in optimizer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    masters = [m for m, p in zip(optimizer.masters, optimizer.params) if m is not p]
    report = {"parameters": sum(local_bytes(p) for p in trainer.model.parameters()),
              "optimizer": sum(local_bytes(t) for t in state + masters)}
    Path(output_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


def main() -> None:
    spec = json.loads(sys.argv[1])
    model, tokenizer = load_model(spec["model"], dtype="float32", device="cpu")
    values = dict(model_name_or_path=spec["model"], dtype="float32", disable_tqdm=True, **spec["config"])
    if spec["kind"] == "sft":
        trainer = SFTTrainer(model, tokenizer, SFTConfig(**values), train_dataset=tiny_sft_rows(40))
        trainer.train()
        if spec.get("report"):
            write_memory_report(trainer, values["output_dir"])
        return
    calls = {"n": 0}

    def vowel_share(completions: list[str], **kwargs: object) -> list[float]:
        calls["n"] += 1
        if spec.get("fail_on_rank") == int(os.environ.get("RANK", "0")) and calls["n"] == 2:
            raise ThriftyError("vowel_share failed on purpose")
        return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]

    GRPOTrainer(model, tokenizer, reward_funcs=[vowel_share], train_dataset=grpo_rows(),
                config=GRPOConfig(**values)).train()


if __name__ == "__main__":
    try:
        main()
    except ThriftyError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
