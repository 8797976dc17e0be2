"""Losses over the language-model head that never build the full [tokens x vocab] logits.

For SmolLM2's 49k vocabulary, 4096 tokens of fp32 logits take 800 MB, and plain
autograd keeps them and their softmax for backward: more than the 135M model itself.
Here the head is applied a chunk of rows at a time inside an autograd Function, so the
extra memory is a few [chunk x vocab] buffers, whatever the sequence length.

With a frozen head (LoRA, QLoRA: the common case) each row's log-prob depends on its own
hidden state only, so its gradient is that row's [hidden] vector times the upstream
scalar: the forward computes those vectors while each chunk's logits are at hand, and
backward only scales them. Building the logits twice (forward, then again in backward)
was ~10% of a LoRA SFT step. A trainable head needs every chunk again for its own
gradient, so that case recomputes the logits in backward.

Per chunk, the softmax statistics and d log p / d logits come from one C++ pass per row
on CPUs with AVX-512 BF16 (kernels/csrc/token_log_probs.cpp), PyTorch ops elsewhere: measured
on a 4 x 512 LoRA SFT step, the whole loss went from 915 to 488 ms.

Both public functions are the same computation, log p(token | hidden) for one token per
row: cross-entropy is its negated sum over labelled rows, GRPO wants it per token.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels.matmul import mm
from thrifty.kernels.native import native_kernel
from thrifty.layers.quant import QuantizedLinear

IGNORE_INDEX = -100

# Default chunk: about 16M logits per chunk (64 MB in fp32), i.e. 341 rows of SmolLM2's
# 49k vocabulary or 110 of Qwen's 152k. Big enough that the matmuls run near full speed.
_CHUNK_LOGITS = 1 << 24


# The output head as the loss multiplies by it: a weight tensor [V, H], or a frozen
# quantized layer (a GGUF file's blocks: QLoRA on the file keeps the head as it is stored).
Head = Union[torch.Tensor, QuantizedLinear]


def output_head(model: nn.Module) -> Head:
    """What the loss multiplies by: model.lm_head's weight, or the layer if quantized."""
    head = model.lm_head
    return head if isinstance(head, QuantizedLinear) else head.weight


def _head_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    return head.matmul(hidden) if isinstance(head, QuantizedLinear) else mm(hidden, head.t())


def _head_input_grad(head: Head, grad: torch.Tensor) -> torch.Tensor:
    return head.input_grad(grad) if isinstance(head, QuantizedLinear) else mm(grad, head)


def _head_shape_dtype(head: Head) -> tuple[int, int, torch.dtype]:
    if isinstance(head, QuantizedLinear):
        return head.out_features, head.in_features, head.compute_dtype
    return head.shape[0], head.shape[1], head.dtype


def default_chunk_size(vocab_size: int) -> int:
    return max(1, _CHUNK_LOGITS // vocab_size)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: Head,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `hidden @ weight.T` against `labels`, as (loss_sum, num_tokens).

    hidden: [..., H] final hidden states (fp32 or bf16); weight: [V, H] the lm_head weight
    (or a frozen quantized head layer: `output_head`);
    labels: [...] target ids, already aligned with hidden (position t predicts labels[t];
    thrifty.sft.batches' come shifted), `ignore_index` where there is no loss.

    Returns the *sum* of per-token losses (fp32 scalar) and the number of labelled tokens
    (int64 scalar), not the mean: with gradient accumulation, packing and several ranks,
    the right token-weighted mean divides by the token count of the whole optimizer step,
    which only the trainer knows. `loss_sum / num_tokens` equals F.cross_entropy's mean.
    """
    hidden, labels = _flatten(hidden, weight, labels)
    # Rows without a label cost nothing, so drop them before the head: with completion-only
    # loss that is most of every prompt. (index_select's backward scatters the grads back.)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    targets = labels.index_select(0, rows)
    _check_targets(targets, _head_shape_dtype(weight)[0])
    log_probs = _token_log_probs(hidden.index_select(0, rows), weight, targets, chunk_size, 1.0)
    return -log_probs.sum(), torch.tensor(rows.numel(), device=labels.device)


def selective_log_probs(
    hidden: torch.Tensor,
    weight: Head,
    token_ids: torch.Tensor,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[token_ids], fp32, shaped like token_ids.

    Differentiable w.r.t. hidden (and weight if it requires grad); the per-token log-probs
    GRPO's ratios and KL need. temperature should match the one used for sampling, so
    the log-probs are those of the distribution the tokens were drawn from.
    """
    if temperature <= 0:
        raise ThriftyError(f"temperature must be positive for log-probs, got {temperature}.")
    shape = token_ids.shape
    hidden, token_ids = _flatten(hidden, weight, token_ids)
    _check_targets(token_ids, _head_shape_dtype(weight)[0])
    return _token_log_probs(hidden, weight, token_ids, chunk_size, float(temperature)).view(shape)


def _token_log_probs(hidden: torch.Tensor, weight: Head, targets: torch.Tensor,
                     chunk_size: int | None, temperature: float) -> torch.Tensor:
    chunk = chunk_size or default_chunk_size(_head_shape_dtype(weight)[0])
    if isinstance(weight, QuantizedLinear):  # frozen: no weight gradient, whatever is asked
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _FrozenHeadTokenLogProbs.apply(hidden, weight, targets, chunk, temperature)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            out[start:end] = _chunk_log_probs(_head_logits(weight, hidden[start:end]), targets[start:end], temperature)
        return out
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return _FrozenHeadTokenLogProbs.apply(hidden, weight, targets, chunk, temperature)
    return _ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk, temperature)


def _flatten(hidden: torch.Tensor, weight: Head, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Big matmuls must be 2-D: a 3-D bf16 input against a large weight can fall into a
    # bmm over an expanded weight, hundreds of times slower (see DESIGN.md).
    _, width, dtype = _head_shape_dtype(weight)
    if hidden.dtype != dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and lm_head weight ({dtype}) must share a dtype.")
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the weight's {width}.")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    ids = ids.reshape(-1)
    if ids.numel() != hidden.shape[0]:
        raise ValueError(f"{ids.numel()} token ids for {hidden.shape[0]} hidden rows.")
    return hidden, ids


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        bad = int(targets.max()) if int(targets.max()) >= vocab_size else int(targets.min())
        raise ThriftyError(
            f"token id {bad} is outside the model's vocabulary of {vocab_size} tokens: the data was "
            "tokenized with a different tokenizer than this model's. Tokenize with the model's own tokenizer."
        )


def _chunk_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) per row of a chunk of head outputs (the matmul ran in the model's
    dtype, 2x faster in bf16; the softmax statistics are fp32). With grad_scale [rows],
    `logits` is overwritten with grad_scale * d log p / d logits, in its own dtype."""
    native = native_kernel("token_log_probs") if logits.device.type == "cpu" else None
    if native is not None:
        return native.token_log_probs(logits, targets, temperature, grad_scale)
    scaled = logits.float()
    if temperature != 1.0:
        scaled.div_(temperature)
    log_p = torch.log_softmax(scaled, dim=-1)
    out = log_p[torch.arange(targets.shape[0], device=logits.device), targets]
    if grad_scale is not None:
        logits.copy_(_log_prob_grad_(log_p, targets).mul_(grad_scale[:, None]))
    return out


def _log_prob_grad_(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d log p_t / d logits = onehot(t) - softmax, built in place in the [rows, vocab]
    log-prob buffer."""
    g = log_p.exp_().neg_()
    g[torch.arange(targets.shape[0], device=g.device), targets] += 1.0
    return g


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log p(target_i | hidden_i) for each row, chunk by chunk, with logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):  # type: ignore[no-untyped-def]
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            out[start:end] = _chunk_log_probs(mm(hidden[start:end], weight.t()), targets[start:end], temperature)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate the weight grad in fp32: it sums over every token of the batch.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        n, size, temperature = hidden.shape[0], ctx.chunk_size, ctx.temperature
        for start in range(0, n, size):
            end = min(start + size, n)
            h = hidden[start:end]
            g = mm(h, weight.t())  # becomes d loss / d logits in place
            _chunk_log_probs(g, targets[start:end], temperature, grad_out[start:end] / temperature)
            if need_hidden:
                grad_hidden[start:end] = mm(g, weight)
            if need_weight:
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += mm(g.t(), h).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


class _FrozenHeadTokenLogProbs(torch.autograd.Function):
    """log p(target_i | hidden_i) for each row, with d/d hidden_i computed in the forward
    pass (the head gets no gradient); backward scales each row's by its upstream grad."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):  # type: ignore[no-untyped-def]
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_grads = torch.empty_like(hidden)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            g = _head_logits(weight, hidden[start:end])  # becomes d log p / d logits in place
            scale = torch.full((end - start,), 1.0 / temperature, device=hidden.device)
            out[start:end] = _chunk_log_probs(g, targets[start:end], temperature, scale)
            row_grads[start:end] = _head_input_grad(weight, g)
        ctx.save_for_backward(row_grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        (row_grads,) = ctx.saved_tensors
        grad_hidden = (row_grads.float() * grad_out[:, None]).to(row_grads.dtype)
        return grad_hidden, None, None, None, None
