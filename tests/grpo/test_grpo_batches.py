"""GRPO's packed micro-batches (each prompt once, then its completions) give the same
log-probs and gradients as running every prompt + completion as its own sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thrifty.formats.loader import load_model
from thrifty.grpo.batches import ROW_TOKENS, balanced_rows, completion_log_probs, pack_groups
from thrifty.layers.lora import LoraConfig, apply_lora, lora_layers

from tiny_tokenizer import save_tiny_model_dir

# Two prompts of different lengths; completions of varied lengths, one of a single token
# (it contributes no input tokens to the row, only a prediction from the prompt).
PROMPTS = [[5, 9, 11, 3], [7, 8, 20, 21, 22, 23, 6]]
COMPLETIONS = [[14, 15, 16, 17, 18, 19], [30], [31, 32, 33], [40, 41, 42, 43, 44, 45, 46, 47], [50, 51]]
OWNER = [0, 0, 0, 1, 1]  # which prompt each completion answers


def reference_log_probs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """The plain way: one sequence, full logits, log-softmax, pick the sampled tokens."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids)[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize(("family", "row_tokens"), [
    ("llama", ROW_TOKENS), ("qwen2", ROW_TOKENS), ("mistral", ROW_TOKENS),  # plain, qkv bias, sliding window of 5
    ("gemma3", ROW_TOKENS),  # local layers' window of 5 beside a global layer
    ("llama", 1),  # a row per group
])
def test_packed_log_probs_and_gradients_equal_one_row_per_completion(family: str, row_tokens: int,
                                                                     tmp_path: Path) -> None:
    save_tiny_model_dir(family, tmp_path)
    model, _ = load_model(tmp_path, dtype="float32", device="cpu")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    prompts = [PROMPTS[i] for i in OWNER]
    T = max(map(len, COMPLETIONS))
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    batch = pack_groups(prompts, COMPLETIONS, mask, torch.zeros(len(COMPLETIONS)), pad_token_id=0,
                        sliding_window=model.config.sliding_window, device=torch.device("cpu"), row_tokens=row_tokens)
    assert batch.input_ids.shape[0] == (1 if row_tokens == ROW_TOKENS else len(PROMPTS))
    assert batch.input_ids.shape[1] % 64 == 0  # rows padded to a few shapes (see ROW_LENGTH_MULTIPLE)
    unpadded = pack_groups(prompts, COMPLETIONS, mask, torch.zeros(len(COMPLETIONS)), pad_token_id=0,
                           sliding_window=None, device=torch.device("cpu"), pad_to_multiple_of=1)
    # Fewer tokens than one row per completion: each prompt appears once.
    assert unpadded.input_ids.numel() < sum(len(p) + len(c) - 1 for p, c in zip(prompts, COMPLETIONS))

    temperature = 0.7
    packed = completion_log_probs(model, batch, temperature)
    weights = torch.randn(packed.shape) * mask  # an arbitrary loss over the real tokens
    (packed * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    expected = torch.zeros_like(packed)
    for i, (prompt, completion) in enumerate(zip(prompts, COMPLETIONS)):
        expected[i, : len(completion)] = reference_log_probs(model, prompt, completion, temperature)
    (expected * weights).sum().backward()

    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(packed[mask == 0] == 0)
    assert packed_grads  # the LoRA weights got gradients
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-5)


def test_same_prompt_in_two_places_is_two_groups() -> None:
    """Groups follow the order given: a prompt that comes back after another starts a new
    group, so micro-batch order (and which completions share a prompt) is never shuffled."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    completions = [[1, 2], [3, 4], [5, 6]]
    batch = pack_groups(prompts, completions, torch.ones(3, 2), torch.zeros(3), pad_token_id=0,
                        sliding_window=None, device=torch.device("cpu"))
    assert batch.input_ids[0, :18].tolist() == PROMPTS[0] + [1] + PROMPTS[1] + [3] + PROMPTS[0] + [5]
    # The third completion's input token sees its own copy of the prompt, not the first.
    assert batch.mask[0, 0, 17].nonzero().squeeze(1).tolist() == list(range(13, 18))


def test_rows_are_balanced_and_hold_whole_groups() -> None:
    assert balanced_rows([100, 100, 100, 100], row_tokens=4096) == [[0, 1, 2, 3]]
    # Two rows needed: the largest groups go to different rows, each row keeps the given order.
    assert balanced_rows([300, 100, 250, 200], row_tokens=450) == [[0, 1], [2, 3]]
    assert balanced_rows([50, 900, 60], row_tokens=100) == [[0, 2], [1]]  # a group longer than row_tokens
