"""A training run's peak memory, predicted from the model's config and the batch fields
alone, before anything loads: what `thrifty plan` prints and what every `sft`/`grpo` run
checks first (a plan that does not fit stops the run before the model loads).

The peak is the sum of parts that live at once, each from a count and a size:
* the runtime: Python, torch and Thrifty imported, the tokenizer and the data (measured);
* the weights as they sit in memory: dtype bytes per weight, or NF4's 0.52 / int8's ~1 byte
  per decoder weight, or a GGUF file's own block bytes (mapped, the embedding and head
  included: training multiplies by them in their blocks too);
* what training adds per trained weight: LoRA's float32 adapters with gradient and two
  moments (16 bytes, 10 with 8-bit moments); full fine-tuning's gradient, float32 master
  (bf16 weights) and moments (AdamW: 8 bytes; 8-bit: 2 and a bf16 low half instead of the
  master);
* activations per token: with gradient checkpointing each layer's input plus one layer's
  working set, without it every layer's working set; the chunked loss's logits buffers;
* GRPO: the generation's KV cache and its sampling buffers, beside the training step's
  activations (they do not live at once: the larger counts), and the inference plan's
  fused copies of the projections that generation runs on.
The per-token constants are measured on the default model and checked at 1.5B
(benchmarks/bench_memory_plan.py prints predicted against measured peaks).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.errors import ThriftyError
from thrifty.kernels.matmul import bf16_gemm_is_native
from thrifty.layers.lora import LoraConfig, find_target_modules
from thrifty.model.config import ModelConfig
from thrifty.model.decoder import CausalLM

GIB = 2**30
RUNTIME_BYTES = int(0.55 * GIB)  # imports ~0.28 GiB, tokenizer, data, what the allocator keeps
# A checkpointed SFT step returns freed memory to the system (kernels/malloc_tuning.py):
# the allocator keeps little. (GRPO's generation keeps it: its runtime stays the above.)
RETURNING_RUNTIME_BYTES = int(0.30 * GIB)
CHUNK_LOGITS = 1 << 24  # training/losses.py's chunk: a few [chunk x vocab] float32 buffers
LOGIT_BUFFERS = 3
# Per token, in units of 2-byte activations of (hidden_size, intermediate_size) widths,
# fitted to measured peaks of the default model (benchmarks/bench_memory_plan.py):
# the working set of the layer being recomputed under checkpointing (its activations,
# their gradients, float32 upcasts where bf16 products are not native, and what the
# allocator holds between them, little since checkpointed steps return freed memory) ...
WORKING_HIDDEN, WORKING_INTERMEDIATE = 20, 11
# ... and, without checkpointing, what each layer keeps for its backward.
KEPT_HIDDEN, KEPT_INTERMEDIATE = 12, 6
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 scale per 256 blocks
INT8_BYTES = 1.0


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know of a model, read without loading its weights: counts
    come from the model built on the meta device (shapes, no storage)."""

    config: ModelConfig
    source: str
    gguf_block_bytes: int | None = None  # a GGUF file's quantized matrices, as stored

    @functools.cached_property
    def skeleton(self) -> nn.Module:
        with torch.device("meta"):
            return CausalLM(self.config)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.skeleton.parameters())  # tied weights once

    @property
    def linear_params(self) -> int:
        """The decoder layers' projections: what nf4/int8 quantize."""
        return sum(m.weight.numel() for m in self.skeleton.model.layers.modules() if isinstance(m, nn.Linear))

    def lora_params(self, target_modules: Any, r: int) -> int:
        modules = dict(self.skeleton.named_modules())
        names = find_target_modules(self.skeleton, LoraConfig(r=r, target_modules=target_modules))
        return sum(r * (modules[n].in_features + modules[n].out_features) for n in names)


def read_model_facts(name_or_path: str | None) -> ModelFacts:
    """The config of a model directory, a .gguf file or the default model (None)."""
    from thrifty.formats.default_model import resolve_model_path
    from thrifty.formats.hf import load_hf_config

    path = resolve_model_path(name_or_path)
    if path.is_dir():
        return ModelFacts(load_hf_config(path), str(path))
    from thrifty.formats.gguf import read_gguf
    from thrifty.kernels.gguf_blocks import BLOCK_LAYOUTS

    config, _, tensors = read_gguf(path)
    blocks = sum(int(t.n_bytes) for t in tensors.tensors.values()
                 if int(t.tensor_type) in BLOCK_LAYOUTS and len(t.shape) == 2)
    return ModelFacts(config, str(path), blocks)


@dataclass
class MemoryPlan:
    """Predicted peak RSS of one run, as named parts."""

    title: str
    parts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.parts)

    def table(self) -> str:
        width = max(len(name) for name, _ in self.parts)
        lines = [self.title] + [f"  {name:<{width}}  {size / GIB:6.2f} GiB" for name, size in self.parts]
        return "\n".join(lines + [f"  {'predicted peak RSS':<{width}}  {self.total / GIB:6.2f} GiB"])


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _weights(facts: ModelFacts, config: Any) -> list[tuple[str, int]]:
    dtype = _dtype_bytes(config.dtype)
    quantize = config.quantize
    dense_rest = (facts.params - facts.linear_params) * dtype
    if quantize is None:
        return [(f"weights ({config.dtype})", facts.params * dtype)]
    if quantize == "gguf":
        if facts.gguf_block_bytes is None:
            raise ThriftyError(f"quantize: gguf needs a .gguf file; {facts.source} is not one.")
        return [("weights (the GGUF file's blocks, mapped)", facts.gguf_block_bytes)]
    per_weight = NF4_BYTES if quantize == "nf4" else INT8_BYTES
    return [(f"decoder weights ({quantize})", int(facts.linear_params * per_weight)),
            (f"embedding and head ({config.dtype})", dense_rest)]


def _training_state(facts: ModelFacts, config: Any) -> tuple[str, int]:
    eight_bit = config.eight_bit_optimizer
    if config.use_lora:
        n = facts.lora_params(config.lora_target_modules, config.lora_r)
        return (f"LoRA r={config.lora_r}: {n / 1e6:.1f}M float32 weights, gradients, "
                f"{'8-bit' if eight_bit else '32-bit'} moments", n * (10 if eight_bit else 16))
    dtype = _dtype_bytes(config.dtype)
    n = facts.params
    if eight_bit:  # bf16 gradient, bf16 low half (bf16 weights), 8-bit moments
        per = dtype + (2 if dtype == 2 else 0) + 2
    else:  # float32 gradient at the step, float32 master (bf16 weights), 32-bit moments
        per = 4 + (4 if dtype == 2 else 0) + 8
    return (f"full fine-tuning: gradients, {'low halves' if eight_bit else 'masters'}, "
            f"{'8-bit' if eight_bit else '32-bit'} moments of {n / 1e6:.0f}M weights", n * per)


def _activations(facts: ModelFacts, tokens: int, config: Any) -> int:
    c = facts.config
    if not config.gradient_checkpointing:
        per_token = c.num_hidden_layers * (KEPT_HIDDEN * c.hidden_size + KEPT_INTERMEDIATE * c.intermediate_size) * 2
        return tokens * per_token
    # Each layer keeps its input, and what the keep_* switches name (model/activation_checkpointing.py).
    kept = c.hidden_size
    if config.gradient_checkpointing_keep_mlp and config.use_lora:
        kept += 2 * c.intermediate_size
    if config.gradient_checkpointing_keep_attention and config.use_lora:
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        kept += 2 * q + 2 * kv + 2 * c.num_attention_heads
    working = WORKING_HIDDEN * c.hidden_size + WORKING_INTERMEDIATE * c.intermediate_size
    return tokens * (c.num_hidden_layers * kept + working) * 2


def _logits(facts: ModelFacts, tokens: int) -> int:
    vocab = facts.config.vocab_size
    rows = min(tokens, max(1, CHUNK_LOGITS // vocab))
    return LOGIT_BUFFERS * rows * vocab * 4


def _method(config: Any) -> str:
    return f"QLoRA ({config.quantize})" if config.quantize else "LoRA" if config.use_lora else "full"


def _model_parts(facts: ModelFacts, config: Any, runtime: int = RUNTIME_BYTES) -> list[tuple[str, int]]:
    """What every run holds whatever its batch: runtime, weights, training state."""
    return [("runtime (Python, torch, tokenizer, data)", runtime), *_weights(facts, config),
            _training_state(facts, config)]


def plan_sft(facts: ModelFacts, config: Any) -> MemoryPlan:
    tokens = config.per_device_train_batch_size * config.max_length
    plan = MemoryPlan(f"SFT {_method(config)}, {config.per_device_train_batch_size} x {config.max_length} tokens "
                      f"per micro-batch, checkpointing {'on' if config.gradient_checkpointing else 'off'}")
    runtime = RETURNING_RUNTIME_BYTES if config.gradient_checkpointing else RUNTIME_BYTES
    plan.parts = [*_model_parts(facts, config, runtime),
                  ("activations", _activations(facts, tokens, config)),
                  ("loss (chunked logits)", _logits(facts, tokens))]
    return plan


def plan_grpo(facts: ModelFacts, config: Any, prompt_tokens: int | None = None) -> MemoryPlan:
    """prompt_tokens: the longest prompt the run will see (as rendered and tokenized), if
    known; else max_prompt_length, an upper bound."""
    c = facts.config
    prompt = prompt_tokens or config.max_prompt_length or 512
    length = prompt + config.max_completion_length
    generated = config.generation_batch_size or (config.per_device_train_batch_size * (
        config.steps_per_generation or config.gradient_accumulation_steps))
    kv = generated * length * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * _dtype_bytes(config.dtype)
    sampling = generated * c.vocab_size * 4 * 2  # the step's logits and probabilities
    tokens = config.per_device_train_batch_size * length
    training = _activations(facts, tokens, config) + _logits(facts, tokens)
    plan = MemoryPlan(f"GRPO {_method(config)}, {generated} completions per generation of {prompt} + "
                      f"{config.max_completion_length} tokens, {config.per_device_train_batch_size} per micro-batch")
    plan.parts = _model_parts(facts, config)
    if config.beta > 0 and not config.use_lora:
        plan.parts.append(("reference model (beta > 0)", facts.params * _dtype_bytes(config.dtype)))
    if config.quantize is None:  # generation runs on the inference plan's fused q/k/v, gate/up copies
        if config.rollout_quantization is None:
            # Where bf16 products are not native, the plan reads bf16 weights in place (fused_linear.py).
            if config.dtype == "float32" or bf16_gemm_is_native():
                plan.parts.append(("fused projections for generation",
                                   facts.linear_params * _dtype_bytes(config.dtype)))
        else:  # GGUF blocks: 34 (Q8_0) or 18 (Q4_0) bytes per 32 weights
            block_bytes = 34 if config.rollout_quantization == "q8_0" else 18
            plan.parts.append((f"{config.rollout_quantization} projections for generation",
                               facts.linear_params * block_bytes // 32))
    plan.parts.append(("generation (KV cache, sampling) or training step, the larger",
                       max(kv + sampling, training)))
    return plan


def available_memory() -> int | None:
    """MemAvailable (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(plan: MemoryPlan, config: Any) -> None:
    """Stop before loading when the plan exceeds the memory available now, with the plan
    and what to change. THRIFTY_IGNORE_MEMORY_PLAN=1 runs anyway."""
    available = available_memory()
    if available is None or plan.total <= available or os.environ.get("THRIFTY_IGNORE_MEMORY_PLAN") == "1":
        return
    advice = ["lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch)"]
    if not getattr(config, "gradient_checkpointing", True):
        advice.append("set gradient_checkpointing: true")
    advice.append("lower max_length" if hasattr(config, "max_length") else "lower max_completion_length")
    if not config.use_lora:
        advice.append("train LoRA adapters (use_lora: true), or optim: adamw_8bit")
    elif config.quantize is None:
        advice.append("quantize the frozen base (quantize: nf4, or gguf for a .gguf file)")
    raise ThriftyError(f"this run needs about {plan.total / GIB:.1f} GiB, and {available / GIB:.1f} GiB is "
                       f"available:\n{plan.table()}\nTo fit: " + "; ".join(advice) + ". (To run anyway: "
                       "THRIFTY_IGNORE_MEMORY_PLAN=1.)")
