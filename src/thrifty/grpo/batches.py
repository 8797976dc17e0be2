"""GRPO training batches with each prompt computed once for its whole group.

GRPO samples num_generations completions per prompt, and the policy's log-probs need
a forward and backward pass over prompt + completion. Laid out as one row per
completion, every prompt goes through the model num_generations times (the demo's
38-token prompt is ~40% of its rows) and each row is padded to the longest completion.

Here a group (one prompt followed by its completions, one after the other) is laid out

    [prompt | completion 1 | completion 2 | ... ]

and the attention mask lets each completion see its group's prompt and its own earlier
tokens only, with positions restarting after the prompt for each completion. Every
completion token then sees exactly the keys, values and positions it would see in its
own row, so the log-probs are those of the row-per-completion layout (tested against
it), for about (prompt + G * completion) / (G * (prompt + completion)) of the tokens.

Groups are laid end to end in a row, as many as fit in ROW_TOKENS, rows balanced: with
a row per group, every row was padded to the longest group, 10-30% of the tokens of a
4 x 8 x 64 step. The attention kernels skip the blocks between groups (kernels/attention.py).
Log-probs are computed for real completion tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.model.decoder import CausalLM, causal_mask
from thrifty.training.losses import output_head, selective_log_probs

PADDING = -1  # the group and segment of padding tokens
# Rows are padded to a multiple of this many tokens. Unpadded, every micro-batch had a new
# row length, so new matmul shapes, and oneDNN kept a primitive for each: the demo's RSS
# crept up all run (peak 2.6 GB; 2.2 GB padded). In an interleaved A/B, an update on the
# same rollouts took the same time padded or not.
ROW_LENGTH_MULTIPLE = 64
# Tokens per row beyond which groups go to another row (unless one group alone is longer):
# the attention mask is [rows, 1, L, L], so it grows with the square of the row length.
ROW_TOKENS = 4096


@dataclass
class MicroBatch:
    """Completions packed by group into rows; the loss side sees them as [B, T] as usual."""

    input_ids: torch.Tensor  # [R, L]: groups of a prompt, then each completion without its last token
    positions: torch.Tensor  # [R, L]
    mask: torch.Tensor  # [R, 1, L, L] boolean, True where a query may attend to a key
    predictors: torch.Tensor  # [N] flat index into the R * L hidden states: the one predicting each real token
    targets: torch.Tensor  # [N] completion index * T + token index of each real token
    completion_ids: torch.Tensor  # [B, T], right-padded
    completion_mask: torch.Tensor  # [B, T] float: 1 on tokens that count in the loss
    advantages: torch.Tensor  # [B]
    sampling_log_probs: torch.Tensor | None = None  # [B, T]: the sampler's, when other weights sampled


@dataclass
class RankSlice:
    """This rank's part of one micro-batch (all of it in a world of one)."""

    batch: MicroBatch  # this rank's completions (a stand-in if it has none: weight 0)
    weight: float  # 1, or 0 for the stand-in
    sequences: int  # completions in the whole micro-batch, all ranks
    tokens: float  # loss tokens in the whole micro-batch, all ranks


def pack_groups(prompts: list[list[int]], completions: list[list[int]], completion_mask: torch.Tensor,
                advantages: torch.Tensor, *, pad_token_id: int, sliding_window: int | None,
                device: torch.device, pad_to_multiple_of: int = ROW_LENGTH_MULTIPLE,
                row_tokens: int = ROW_TOKENS) -> MicroBatch:
    """Pack completions (and their prompts: prompts[i] belongs to completions[i]) into rows.

    Consecutive completions with the same prompt form a group; completion_mask [B, T] and
    advantages [B] are per completion, in the given order. Rows hold whole groups, about
    row_tokens tokens at most, and are right-padded to a multiple of pad_to_multiple_of.
    """
    if any(not completion for completion in completions):
        raise ValueError("every completion needs at least one token (generation always yields one).")
    groups: list[list[int]] = []  # completion indices of each group
    for i, prompt in enumerate(prompts):
        if i == 0 or prompt != prompts[i - 1]:
            groups.append([])
        groups[-1].append(i)
    # The last completion token is never an input: it is only predicted.
    sizes = [len(prompts[members[0]]) + sum(len(completions[i]) - 1 for i in members) for members in groups]
    rows = balanced_rows(sizes, row_tokens)
    length = -(-max(sum(sizes[g] for g in row) for row in rows) // pad_to_multiple_of) * pad_to_multiple_of

    tokens, positions, group_ids, segments = ([[] for _ in rows] for _ in range(4))
    predictors: list[list[int]] = [[] for _ in completions]  # flat index of each completion's predictors
    for r, row in enumerate(rows):
        for g in row:
            prompt = prompts[groups[g][0]]
            tokens[r] += prompt
            positions[r] += range(len(prompt))
            group_ids[r] += [g] * len(prompt)
            segments[r] += [0] * len(prompt)
            prompt_end = len(tokens[r]) - 1
            for segment, i in enumerate(groups[g], start=1):
                completion, start = completions[i], len(tokens[r])
                # Token 0 is predicted by the prompt's last position, token t by completion token t - 1.
                predictors[i] = [r * length + prompt_end] + [r * length + start + t for t in range(len(completion) - 1)]
                tokens[r] += completion[:-1]
                positions[r] += range(len(prompt), len(prompt) + len(completion) - 1)
                group_ids[r] += [g] * (len(completion) - 1)
                segments[r] += [segment] * (len(completion) - 1)

    def padded(rows_of_values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([values + [fill] * (length - len(values)) for values in rows_of_values], device=device)

    positions_t = padded(positions, 0)
    T = completion_mask.shape[1]
    lengths = torch.tensor([len(c) for c in completions])
    real = torch.arange(T)[None, :] < lengths[:, None]
    return MicroBatch(
        input_ids=padded(tokens, pad_token_id), positions=positions_t,
        mask=group_mask(positions_t, padded(group_ids, PADDING), padded(segments, PADDING), sliding_window),
        predictors=torch.tensor([index for indices in predictors for index in indices], device=device),
        targets=real.flatten().nonzero().squeeze(1).to(device),
        completion_ids=torch.tensor([c + [pad_token_id] * (T - len(c)) for c in completions], device=device),
        completion_mask=completion_mask.to(device), advantages=advantages.to(device))


def balanced_rows(sizes: list[int], row_tokens: int) -> list[list[int]]:
    """Group indices per row: as few rows as keep each near row_tokens (or the largest
    group), groups spread so the rows' totals are even (every row is padded to the
    longest), groups and rows in the given order."""
    count = -(-sum(sizes) // max(row_tokens, max(sizes)))
    rows: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):  # largest first, to the emptiest row
        r = totals.index(min(totals))
        rows[r].append(g)
        totals[r] += sizes[g]
    return sorted(sorted(row) for row in rows)


def group_mask(positions: torch.Tensor, groups: torch.Tensor, segments: torch.Tensor,
               sliding_window: int | None) -> torch.Tensor:
    """[R, 1, L, L]: the model's causal rule on positions (and sliding window), limited to
    the query's own group, and in it to the prompt (segment 0) and the query's own
    segment. Padding (group and segment PADDING, position 0) sees only padding: never an
    empty row, which would make SDPA produce NaNs."""
    same_group = groups.unsqueeze(1) == groups.unsqueeze(-1)
    same_segment = (segments.unsqueeze(1) == 0) | (segments.unsqueeze(1) == segments.unsqueeze(-1))
    visible = causal_mask(positions, positions.shape[1], sliding_window, key_positions=positions)
    return visible & (same_group & same_segment).unsqueeze(1)


def completion_log_probs(model: CausalLM, batch: MicroBatch, temperature: float) -> torch.Tensor:
    """[B, T] log-probs of the completion tokens (0 on padding), differentiable."""
    hidden = model.hidden_states(batch.input_ids, batch.positions, batch.mask)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predictors)
    targets = batch.completion_ids.flatten().index_select(0, batch.targets)
    real = selective_log_probs(hidden, output_head(model), targets, temperature=temperature)
    out = real.new_zeros(batch.completion_ids.numel())
    return out.index_put((batch.targets,), real).view_as(batch.completion_ids)
