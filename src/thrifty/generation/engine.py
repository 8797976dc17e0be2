"""Batched text generation: the engine GRPO rollouts and `thrifty generate` run on.

Why it is fast on a CPU:
* the KV cache is allocated once per call, and decoding writes into it in place;
* prompts are left-padded so a batch advances in lockstep, and each distinct prompt
  is prefilled once, then its cache is repeated for its `num_return_sequences` samples
  (GRPO samples a group of 8 or more completions per prompt);
* finished rows are dropped from the batch so they stop costing matmuls;
* sampling avoids torch.multinomial over the vocabulary (see sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from thrifty.errors import ThriftyError
from thrifty.generation.sampling import RowGenerators, SamplingParams, sample_next_tokens
from thrifty.model.decoder import CausalLM, causal_mask
from thrifty.model.inference_plan import InferencePlan
from thrifty.model.kv_cache import KVCache

if TYPE_CHECKING:
    from thrifty.model.tokenizer import Tokenizer

Message = dict[str, str]
Prompt = str | Sequence[Message]
FinishReason = Literal["stop", "length"]
# Called after each decode step with (row indices into the full output, their new tokens).
StepCallback = Callable[[list[int], list[int]], None]


@dataclass
class Completion:
    prompt_index: int
    sample_index: int  # 0 .. num_return_sequences-1
    text: str
    token_ids: list[int]  # generated tokens, including the EOS token that ended them
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": hit max_new_tokens

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


def render_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: bool, system_prompt: str | None,
                  max_length: int | None = None) -> list[int]:
    """Token ids of one prompt: chat-templated (with a generation prompt) or raw text. A
    prompt longer than max_length keeps its last tokens, where the question is (TRL's
    max_prompt_length)."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system_prompt is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise ThriftyError("chat=False needs plain-text prompts, not message lists.")
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids[-max_length:] if max_length else ids


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    chat: bool = True,
    system_prompt: str | None = None,
    on_step: StepCallback | None = None,
    plan: InferencePlan | None = None,
) -> list[Completion]:
    """Complete each prompt `num_return_sequences` times.

    prompts: a string, a chat message list, or a list of either. With chat=True strings
    become a user message and the model's chat template is applied.
    plan: the InferencePlan to run on (keep one across calls while the weights do not
    change, as `thrifty chat` does); None builds one for this call.
    Returns the completions in prompt order, `num_return_sequences` per prompt.
    """
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]  # type: ignore[list-item]
    if not prompts:
        return []
    if stop is not None and (isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop)):
        raise ThriftyError(f"stop strings must be a list of non-empty strings, got {stop!r} (an empty string "
                           "matches at once, so nothing would be generated).")
    prompt_ids = [render_prompt(tokenizer, p, chat, system_prompt) for p in prompts]  # type: ignore[arg-type]
    sampling = SamplingParams(temperature, top_k, top_p, min_p)
    tokens, reasons = generate_tokens(
        model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
        num_return_sequences=num_return_sequences, seed=seed,
        stop_token_ids=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
        stop_checker=StopStrings(tokenizer, stop) if stop else None, on_step=on_step, plan=plan,
    )
    completions = []
    for row, (ids, reason) in enumerate(zip(tokens, reasons)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop:
            text = cut_at_stop_string(text, stop)
        prompt_index, sample_index = divmod(row, num_return_sequences)
        completions.append(Completion(prompt_index, sample_index, text, ids, reason))
    return completions


class StopStrings:
    """Detects a stop string at the end of a row's text, decoding only a short tail."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        # A token holds at least one character, so this many tokens cover any stop string
        # plus the token that may end just after it.
        self.tail_tokens = max(len(s) for s in self.stop) + 1

    def __call__(self, generated: list[int]) -> bool:
        tail = self.tokenizer.decode(generated[-self.tail_tokens:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)


def cut_at_stop_string(text: str, stop: Sequence[str]) -> str:
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


@torch.inference_mode()
def generate_tokens(
    model: CausalLM,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    num_return_sequences: int = 1,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    stop_checker: Callable[[list[int]], bool] | None = None,
    on_step: StepCallback | None = None,
    min_new_tokens: int = 0,
    row_seeds: Sequence[int] | None = None,
    plan: InferencePlan | None = None,
    sampled_log_probs: list[list[float]] | None = None,
) -> tuple[list[list[int]], list[FinishReason]]:
    """The engine on token ids. Returns, per output row (prompt-major), the generated ids
    and why each row finished. Before min_new_tokens tokens, the stop tokens get no
    probability (transformers' min_new_tokens). row_seeds (one per output row, instead of
    `seed`) give each row its own random stream (RowGenerators). plan: the model's current
    InferencePlan (None: one is built for this call). sampled_log_probs, an empty list if
    given, receives per output row the log-probability of each generated token under the
    weights that sampled it, at the sampling temperature and before top-k/top-p/min-p and
    min_new_tokens (what a trainer's forward computes for the same tokens: GRPO compares
    the two when rollouts come from quantized weights)."""
    if max_new_tokens < 1:
        raise ThriftyError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ThriftyError(f"min_new_tokens must be between 0 and max_new_tokens ({max_new_tokens}), "
                           f"got {min_new_tokens}.")
    if num_return_sequences < 1:
        raise ThriftyError(f"num_return_sequences must be at least 1, got {num_return_sequences}.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ThriftyError("a prompt is empty after tokenization; give at least one token.")
    if plan is None:
        plan = InferencePlan.build(model)
    elif plan.model is not model:
        raise ThriftyError("generate: the inference plan was built for another model.")
    with plan.active():
        return _generate(model, plan, prompt_ids, max_new_tokens, sampling, num_return_sequences, seed,
                         stop_token_ids, pad_token_id, stop_checker, on_step, min_new_tokens, row_seeds,
                         sampled_log_probs)


def _generate(model: CausalLM, plan: InferencePlan, prompt_ids: list[list[int]], max_new_tokens: int,
              sampling: SamplingParams, num_return_sequences: int, seed: int | None, stop_token_ids: Sequence[int],
              pad_token_id: int, stop_checker: Callable[[list[int]], bool] | None, on_step: StepCallback | None,
              min_new_tokens: int, row_seeds: Sequence[int] | None,
              sampled_log_probs: list[list[float]] | None) -> tuple[list[list[int]], list[FinishReason]]:
    device = model.device
    num_rows = len(prompt_ids) * num_return_sequences
    # The random numbers come from one generator, or from one per row; only the one in use
    # is made (an unseeded one would draw its seed from torch's global generator).
    generator, row_generators = None, None
    if row_seeds is not None:
        if len(row_seeds) != num_rows:
            raise ValueError(f"{len(row_seeds)} row_seeds for {num_rows} output rows.")
        row_generators = RowGenerators(list(row_seeds), device)
    else:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    prompt_len = max(len(p) for p in prompt_ids)
    total_len = prompt_len + max_new_tokens
    if total_len > model.config.max_position_embeddings:
        raise ThriftyError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {model.config.max_position_embeddings} tokens; shorten either."
        )
    # Left-pad every prompt to prompt_len. Slot j of row r holds position j - pad[r].
    pads = torch.tensor([prompt_len - len(p) for p in prompt_ids], device=device)
    input_ids = torch.tensor(
        [[pad_token_id] * (prompt_len - len(p)) + p for p in prompt_ids], device=device
    )
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, len(prompt_ids), cfg.num_key_value_heads, total_len,
                    cfg.head_dim, model.dtype, device)
    slots = torch.arange(total_len, device=device)
    key_positions = slots.unsqueeze(0) - pads.unsqueeze(1)  # [rows, total_len]

    # Prefill each distinct prompt once; only the last position's logits are needed.
    prefill_mask = attention_mask(key_positions[:, :prompt_len], key_positions[:, :prompt_len],
                                  cfg.sliding_window)
    hidden = model.hidden_states(input_ids, key_positions[:, :prompt_len].clamp(min=0),
                                 prefill_mask, cache)
    logits = model.logits(hidden[:, -1])

    # Then give every sample its own copy of the prompt's cache.
    if num_return_sequences > 1:
        rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(num_return_sequences)
        cache.select_rows(rows)
        logits = logits[rows]
        key_positions = key_positions[rows]
    active = list(range(num_rows))  # output row of each batch row
    generated: list[list[int]] = [[] for _ in range(num_rows)]
    reasons: list[FinishReason] = ["length"] * num_rows
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), device=device, dtype=torch.long)
    done = [False] * num_rows  # per batch row: finished, its further tokens dropped
    decoding_step = plan.decoding_step
    if sampled_log_probs is not None:
        sampled_log_probs[:] = [[] for _ in range(num_rows)]
    temperature = sampling.temperature or 1.0

    for step in range(max_new_tokens):
        unfiltered = logits
        if step < min_new_tokens and len(stop_ids):
            logits = logits.index_fill(1, stop_ids, float("-inf"))
        uniform = None if row_generators is None or sampling.greedy else row_generators.uniform(active)
        next_tokens = sample_next_tokens(logits, sampling, generator, uniform)
        token_log_probs = None
        if sampled_log_probs is not None:
            token_log_probs = torch.log_softmax(unfiltered.float() / temperature, dim=-1).gather(
                1, next_tokens.unsqueeze(1)).squeeze(1).tolist()
        # NaN propagates through amax, so one reduction per step catches a broken model or
        # kernel instead of sampling token 0 forever (~0.1 ms at 16 x 49k).
        finite = torch.isfinite(logits.amax(dim=-1))
        finished = torch.isin(next_tokens, stop_ids).tolist()
        if not bool(finite.all()):
            raise_non_finite_logits(step, finite, model.dtype)
        new_tokens = next_tokens.tolist()
        live = [i for i, row_done in enumerate(done) if not row_done]
        for i in live:
            row = active[i]
            generated[row].append(new_tokens[i])
            if token_log_probs is not None:
                sampled_log_probs[row].append(token_log_probs[i])  # type: ignore[index]
            if finished[i] or (stop_checker is not None and stop_checker(generated[row])):
                reasons[row] = "stop"
                done[i] = True
        if on_step is not None:
            on_step([active[i] for i in live], [new_tokens[i] for i in live])
        if step == max_new_tokens - 1 or all(done):
            break
        # Finished rows leave the batch once they are a quarter of it. Dropping rows copies
        # every layer's cache (~5 ms at 32 rows and 60 tokens; a GRPO step had ~16 such
        # copies when each finish dropped its row), while a finished row kept costs only
        # its share of attention and sampling (~0.2 ms a step).
        if 4 * sum(done) >= len(done):
            keep = [i for i, row_done in enumerate(done) if not row_done]
            index = torch.tensor(keep, device=device)
            cache.select_rows(index)
            key_positions = key_positions[index]
            next_tokens = next_tokens[index]
            active = [active[i] for i in keep]
            done = [False] * len(keep)
        end = cache.length + 1
        query_positions = key_positions[:, cache.length:end]
        mask = attention_mask(query_positions, key_positions[:, :end], cfg.sliding_window)
        hidden = decoding_step(next_tokens, query_positions, mask, cache) if decoding_step is not None else None
        if hidden is None:
            hidden = model.hidden_states(next_tokens.unsqueeze(1), query_positions, mask, cache)[:, -1]
        logits = model.logits(hidden)
    return generated, reasons


def raise_non_finite_logits(step: int, finite: torch.Tensor, dtype: torch.dtype) -> None:
    bad = int((~finite).sum())
    raise ThriftyError(
        f"generation stopped: the model produced NaN or infinite logits at new token {step + 1} "
        f"({bad} of {finite.numel()} rows). The weights or a kernel are wrong for this model. To find "
        f"which: rerun with THRIFTY_NATIVE=0 (PyTorch's kernels instead of Thrifty's native ones)"
        + (" or with dtype float32" if dtype != torch.float32 else "")
        + "; if either fixes it, please report it with the model's name.")


def attention_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """[rows, 1, queries, keys] boolean mask over left-padded slots.

    A query attends to real keys at or before it (and within the sliding window).
    Padding queries attend only to themselves: a row with no visible key would make
    SDPA produce NaNs, which would then leak through 0 * NaN into real rows' outputs.
    """
    allowed = causal_mask(query_positions, key_positions.shape[1], sliding_window, key_positions=key_positions)
    allowed &= (key_positions >= 0)[:, None, None, :]
    if query_positions.shape[1] > 1:
        is_padding = (query_positions < 0).unsqueeze(-1)
        allowed |= (is_padding & (query_positions.unsqueeze(-1) == key_positions.unsqueeze(1))).unsqueeze(1)
    return allowed
