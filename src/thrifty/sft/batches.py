"""SFT batches: right-padded (`collate_padded`) or packed without padding
(`pack_examples`, a block-diagonal causal mask), the tensors the trainer feeds the model.

Labels come *shifted*: batch["labels"][b, t] is the token position t must predict, so the
loss is simply `chunked_cross_entropy(hidden.flatten(0, 1), lm_head.weight, labels.flatten())`,
and the last token of a packed example never "predicts" the first token of the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from thrifty.errors import ThriftyError
from thrifty.model.decoder import causal_mask
from thrifty.sft.examples import IGNORE_INDEX, TokenizedExample

# ---------------------------------------------------------------- batches


def shifted_labels(labels: Sequence[int]) -> list[int]:
    """Position t's target is token t+1; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


def collate_padded(examples: Sequence[TokenizedExample], pad_token_id: int, *,
                   sliding_window: int | None = None, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (shifted, -100 on padding), positions [B, T]
    and (with_mask) a boolean attention mask [B, 1, T, T] (True = may attend): causal,
    padding keys hidden. Pass the model's config.sliding_window, since an explicit mask
    replaces the model's own."""
    if not examples:
        raise ValueError("collate_padded needs at least one example.")
    lengths = [len(e) for e in examples]
    if min(lengths) == 0:
        raise ThriftyError("an example has no tokens; remove empty rows from the data.")
    width = max(lengths)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e)] = torch.tensor(e.input_ids)
        labels[b, : len(e)] = torch.tensor(shifted_labels(e.labels))
    positions = torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous()
    if not with_mask:
        return {"input_ids": input_ids, "labels": labels, "positions": positions}
    key_is_real = positions < torch.tensor(lengths).unsqueeze(1)
    mask = causal_mask(torch.arange(width)[None], width, sliding_window)[0, 0] & key_is_real[:, None, None, :]
    # A padding query may see no real key (with a sliding window): let it see itself, or
    # SDPA gives it NaN, which would leak into real rows through 0 * NaN in later layers.
    mask |= torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "mask": mask}


@dataclass
class PackedBatch:
    """Several examples laid end to end in one row [1, T], T <= max_length, no padding.

    positions restart at 0 for each example and the mask is block-diagonal causal, so
    each example attends only to itself: the model computes exactly what it would on
    the examples one by one. labels are shifted, -100 on each example's last position.
    """

    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    mask: torch.Tensor  # [1, 1, T, T] bool
    lengths: list[int]  # of the packed examples, in order

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The same keys as collate_padded's batches."""
        return {"input_ids": self.input_ids, "labels": self.labels, "positions": self.positions, "mask": self.mask}


def pack_examples(examples: Sequence[TokenizedExample], max_length: int, *,
                  sliding_window: int | None = None) -> list[PackedBatch]:
    """Pack examples, in the given order, into sequences of at most max_length tokens
    (next-fit: a sequence is closed when the next example does not fit). Shuffle before
    packing (a DataOrder over the packed sequences then shuffles them between epochs).
    Pass the model's config.sliding_window, since an explicit mask replaces the model's own."""
    groups: list[list[TokenizedExample]] = []
    used = max_length  # forces a new group for the first example
    for i, e in enumerate(examples):
        if len(e) == 0:
            raise ThriftyError(f"example {i} has no tokens; remove empty rows from the data.")
        if len(e) > max_length:
            raise ThriftyError(f"example {i} has {len(e)} tokens, more than the packing length {max_length}; "
                               "tokenize with the same max_length (and truncation) as you pack with.")
        if used + len(e) > max_length:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += len(e)
    return [_pack(group, sliding_window) for group in groups]


def _pack(group: list[TokenizedExample], sliding_window: int | None) -> PackedBatch:
    lengths = [len(e) for e in group]
    input_ids = torch.tensor([t for e in group for t in e.input_ids]).unsqueeze(0)
    labels = torch.tensor([t for e in group for t in shifted_labels(e.labels)]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    segment = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(lengths))
    # Within an example positions are consecutive, so position distance is token distance.
    mask = (causal_mask(torch.arange(len(segment))[None], len(segment), sliding_window)[0, 0] & (segment[:, None] == segment[None, :]))[None, None]
    return PackedBatch(input_ids, labels, positions, mask, lengths)
