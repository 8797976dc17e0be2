"""Activation checkpointing changes no number: with or without keeping the MLP's
gate/up outputs and the attention's q/k/v and output, gradients equal those of the
plain backward, and keeping them takes those matmuls and the attention forward out of
the recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from thrifty.grpo.batches import pack_groups
from thrifty.kernels import native
from thrifty.kernels.native import native_kernel
from thrifty.model.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing

from tiny_models import lora_model


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


class _CountingAttentionForward:
    """The native module, counting the calls of its attention forward."""

    def __init__(self, module) -> None:  # type: ignore[no-untyped-def]
        self.module, self.calls = module, 0

    def attention_forward(self, *args):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.module.attention_forward(*args)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.module, name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_checkpointing_keeps_gradients_and_keeping_outputs_skips_their_work(
        tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_model(tmp_path, family, torch.bfloat16, rank_pattern={}, alpha_pattern={})
    model.train()
    batch = _batch(model.config.vocab_size)
    module = native_kernel("attention_forward")  # None where the kernels do not build: PyTorch's SDPA
    counting = _CountingAttentionForward(module) if module is not None else None
    if counting is not None:
        monkeypatch.setattr(native, "native_module", lambda: counting)
    runs, attention_calls = {}, {}
    for name, keep in (("plain", None), ("checkpointed", (False, False)), ("keeping the MLP", (True, False)),
                       ("keeping the MLP and attention", (True, True))):
        disable_activation_checkpointing(model)
        if keep is not None:
            enable_activation_checkpointing(model, keep_mlp_outputs=keep[0], keep_attention_outputs=keep[1])
        if counting is not None:
            counting.calls = 0
        runs[name] = _gradients(model, batch)
        attention_calls[name] = counting.calls if counting is not None else None
    disable_activation_checkpointing(model)

    plain, _ = runs["plain"]
    assert len(plain) == 2 * 7 * model.config.num_hidden_layers  # every LoRA A and B
    for name in ("checkpointed", "keeping the MLP", "keeping the MLP and attention"):
        grads, _ = runs[name]
        assert grads.keys() == plain.keys()
        for key in plain:
            assert torch.equal(grads[key], plain[key]), (name, key)

    # The recomputation skips gate/up (2 x hidden x intermediate) and down (intermediate x
    # hidden; not in Gemma 3, whose post-MLP norm reads its output) per token and layer,
    # then q/k/v (hidden x (q + 2 kv)) and the attention forward: nothing else changes.
    cfg = model.config
    tokens, layers = batch.input_ids.numel(), cfg.num_hidden_layers
    skipped_mlp_matmuls = 2 if cfg.gemma_norms else 3
    assert runs["checkpointed"][1] - runs["keeping the MLP"][1] == (
        2 * tokens * skipped_mlp_matmuls * cfg.hidden_size * cfg.intermediate_size * layers)
    assert runs["keeping the MLP"][1] - runs["keeping the MLP and attention"][1] == (
        2 * tokens * cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) * layers)
    # Attention forwards: one per layer, and one more per layer in the recomputation
    # unless its output is kept (only the native kernel's output and logsumexp are kept).
    if counting is not None:
        assert attention_calls["plain"] == attention_calls["keeping the MLP and attention"] == layers
        assert attention_calls["checkpointed"] == attention_calls["keeping the MLP"] == 2 * layers
