"""GRPO training batches with each prompt computed once for its whole group.

GRPO samples num_generations completions per prompt, and the policy's log-probs need
a forward and backward pass over prompt + completion. Laid out as one row per
completion, every prompt goes through the model num_generations times (the demo's
38-token prompt is ~40% of its rows) and each row is padded to the longest completion.

Here a row holds one prompt followed by its completions, one after the other:

    [prompt | completion 1 | completion 2 | ... ]

and the attention mask lets each completion see the prompt and its own earlier tokens
only, with positions restarting after the prompt for each completion. Every completion
token then sees exactly the keys, values and positions it would see in its own row, so
the log-probs are those of the row-per-completion layout (tested against it), for about
(prompt + G * completion) / (G * (prompt + completion)) of the tokens, and padding only
at the end of each group. Log-probs are computed for real completion tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.losses import selective_log_probs
from thrifty.model import CausalLM, causal_mask

PADDING_SEGMENT = -1
# Rows are padded to a multiple of this many tokens. Unpadded, every micro-batch had a new
# row length, so new matmul shapes, and oneDNN kept a primitive for each: the demo's RSS
# crept up all run (peak 2.6 GB; 2.2 GB padded). In an interleaved A/B, an update on the
# same rollouts took the same time padded or not.
ROW_LENGTH_MULTIPLE = 64


@dataclass
class MicroBatch:
    """Completions packed one group per row; the loss side sees them as [B, T] as usual."""

    input_ids: torch.Tensor  # [R, L]: prompt, then each completion without its last token
    positions: torch.Tensor  # [R, L]
    mask: torch.Tensor  # [R, 1, L, L] boolean, True where a query may attend to a key
    predictors: torch.Tensor  # [N] flat index into the R * L hidden states: the one predicting each real token
    targets: torch.Tensor  # [N] completion index * T + token index of each real token
    completion_ids: torch.Tensor  # [B, T], right-padded
    completion_mask: torch.Tensor  # [B, T] float: 1 on tokens that count in the loss
    advantages: torch.Tensor  # [B]


def pack_groups(prompts: list[list[int]], completions: list[list[int]], completion_mask: torch.Tensor,
                advantages: torch.Tensor, *, pad_token_id: int, sliding_window: int | None,
                device: torch.device, pad_to_multiple_of: int = ROW_LENGTH_MULTIPLE) -> MicroBatch:
    """Pack completions (and their prompts: prompts[i] belongs to completions[i]) into rows.

    Consecutive completions with the same prompt share a row; completion_mask [B, T] and
    advantages [B] are per completion, in the given order. Rows are right-padded to a
    multiple of pad_to_multiple_of tokens.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (tokens, positions, segments)
    predictors: list[tuple[int, int]] = []  # (row, column) predicting each real token, completion-major
    if any(not completion for completion in completions):
        raise ValueError("every completion needs at least one token (generation always yields one).")
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if i == 0 or prompt != prompts[i - 1]:
            rows.append((list(prompt), list(range(len(prompt))), [0] * len(prompt)))
            segment = 0
        tokens, positions, segments = rows[-1]
        row, start, segment = len(rows) - 1, len(tokens), segment + 1
        # Token 0 is predicted by the prompt's last position, token t by the completion's
        # token t - 1 (so the last completion token is never an input).
        predictors.append((row, len(prompt) - 1))
        predictors.extend((row, start + t) for t in range(len(completion) - 1))
        tokens.extend(completion[:-1])
        positions.extend(range(len(prompt), len(prompt) + len(completion) - 1))
        segments.extend([segment] * (len(completion) - 1))
    length = -(-max(len(tokens) for tokens, _, _ in rows) // pad_to_multiple_of) * pad_to_multiple_of

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    input_ids = torch.tensor([padded(t, pad_token_id) for t, _, _ in rows], device=device)
    positions = torch.tensor([padded(p, 0) for _, p, _ in rows], device=device)
    segments = torch.tensor([padded(s, PADDING_SEGMENT) for _, _, s in rows], device=device)
    T = completion_mask.shape[1]
    lengths = torch.tensor([len(c) for c in completions])
    real = torch.arange(T)[None, :] < lengths[:, None]
    return MicroBatch(
        input_ids=input_ids, positions=positions, mask=group_mask(positions, segments, sliding_window),
        predictors=torch.tensor([r * length + c for r, c in predictors], device=device),
        targets=real.flatten().nonzero().squeeze(1).to(device),
        completion_ids=torch.tensor([c + [pad_token_id] * (T - len(c)) for c in completions], device=device),
        completion_mask=completion_mask.to(device), advantages=advantages.to(device))


def group_mask(positions: torch.Tensor, segments: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[R, 1, L, L]: the model's causal rule on positions (and sliding window), limited to
    the prompt (segment 0) and the query's own segment. Padding (its own segment, position
    0) sees only padding and the first prompt token: never an empty row, which would make
    SDPA produce NaNs."""
    same_group = (segments.unsqueeze(1) == 0) | (segments.unsqueeze(1) == segments.unsqueeze(-1))
    return causal_mask(positions, positions.shape[1], sliding_window, key_positions=positions) & same_group.unsqueeze(1)


def completion_log_probs(model: CausalLM, batch: MicroBatch, temperature: float) -> torch.Tensor:
    """[B, T] log-probs of the completion tokens (0 on padding), differentiable."""
    hidden = model.hidden_states(batch.input_ids, batch.positions, batch.mask)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predictors)
    targets = batch.completion_ids.flatten().index_select(0, batch.targets)
    real = selective_log_probs(hidden, model.lm_head.weight, targets, temperature=temperature)
    out = real.new_zeros(batch.completion_ids.numel())
    return out.index_put((batch.targets,), real).view_as(batch.completion_ids)
