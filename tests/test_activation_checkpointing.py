"""Activation checkpointing changes no number: with or without keeping the MLP's
gate/up outputs, gradients equal those of the plain backward, and keeping them takes
the MLP's matmuls out of the recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from test_lora_group import lora_model
from thrifty.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from thrifty.grpo_batches import pack_groups


def _batch(vocab: int):
    """GRPO's layout: two prompts, each followed by three completions (masked attention)."""
    generator = torch.Generator().manual_seed(2)
    prompts, completions = [], []
    for prompt_length in (5, 9):
        prompt = torch.randint(0, vocab, (prompt_length,), generator=generator).tolist()
        for length in (4, 7, 2):
            prompts.append(prompt)
            completions.append(torch.randint(0, vocab, (length,), generator=generator).tolist())
    mask = torch.zeros(len(completions), 7)
    for i, completion in enumerate(completions):
        mask[i, :len(completion)] = 1
    return pack_groups(prompts, completions, mask, torch.zeros(len(completions)), pad_token_id=0,
                       sliding_window=None, device=torch.device("cpu"), pad_to_multiple_of=8)


def _gradients(model: torch.nn.Module, batch) -> tuple[dict[str, torch.Tensor], int]:  # type: ignore[no-untyped-def]
    """LoRA gradients of a weighted sum of the hidden states, and the FLOPs of backward."""
    model.zero_grad(set_to_none=True)
    hidden = model.hidden_states(batch.input_ids, batch.positions, batch.mask)
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    loss = (hidden.float() * weights).sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_checkpointing_keeps_gradients_and_keeping_the_mlp_skips_its_matmuls(tmp_path: Path, family: str) -> None:
    model = lora_model(tmp_path, family, torch.bfloat16, rank_pattern={}, alpha_pattern={})
    model.train()
    batch = _batch(model.config.vocab_size)
    runs = {}
    for name, keep in (("plain", None), ("checkpointed", False), ("keeping the MLP", True)):
        disable_activation_checkpointing(model)
        if keep is not None:
            enable_activation_checkpointing(model, keep_mlp_outputs=keep)
        runs[name] = _gradients(model, batch)
    disable_activation_checkpointing(model)

    plain, _ = runs["plain"]
    assert len(plain) == 2 * 7 * model.config.num_hidden_layers  # every LoRA A and B
    for name in ("checkpointed", "keeping the MLP"):
        grads, _ = runs[name]
        assert grads.keys() == plain.keys()
        for key in plain:
            assert torch.equal(grads[key], plain[key]), (name, key)

    # The recomputation skips gate/up (2 x hidden x intermediate) and down (intermediate x
    # hidden) per token and layer: nothing else changes.
    cfg = model.config
    tokens = batch.input_ids.numel()
    skipped = 2 * tokens * 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
    assert runs["checkpointed"][1] - runs["keeping the MLP"][1] == skipped
