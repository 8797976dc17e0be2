"""A model that answers as a transformers / PEFT / Unsloth model does, over Thrifty's CausalLM.

`model(input_ids, attention_mask, labels)` returns `.loss` and `.logits` as transformers
computes them; `generate` returns prompt + new ids as transformers does, on Thrifty's
engine; saving writes PEFT adapters, Hugging Face directories and GGUF files. The
CausalLM stays at `.causal_lm`, and every attribute this class lacks is read from it
(`model.config`, `model.dtype`, ...); Thrifty's trainers take either.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compat.arguments import reject_unknown
from thrifty.compat.tokenizer import BatchEncoding, thrifty_tokenizer
from thrifty.errors import ThriftyError
from thrifty.formats.default_model import DEFAULT_MODEL_NAME
from thrifty.formats.gguf_export import export_gguf, write_ollama_modelfile
from thrifty.formats.gguf_types import ALIASES
from thrifty.formats.hf_export import save_hf_model
from thrifty.formats.open_model import open_model
from thrifty.formats.peft_adapter import save_adapter
from thrifty.generation.engine import generate_tokens
from thrifty.generation.sampling import SamplingParams
from thrifty.layers.lora import merge_lora, trainable_parameters
from thrifty.model.decoder import CausalLM, causal_mask
from thrifty.model.tokenizer import Tokenizer
from thrifty.layers.lora import has_lora

IGNORE_INDEX = -100
SAVE_METHODS = ("merged_16bit", "lora")


@dataclass
class CausalLMOutput:
    """transformers' CausalLMOutputWithPast, the fields Thrifty fills: indexable too
    (`outputs[0]` is the loss when labels were given, else the logits)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return tuple(t for t in (self.loss, self.logits) if t is not None)[index]


class PreTrainedModel(nn.Module):
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, name_or_path: str | None,
                 max_seq_length: int | None = None) -> None:
        super().__init__()
        self.causal_lm = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or DEFAULT_MODEL_NAME
        self.max_seq_length = max_seq_length
        self.gradient_checkpointing = False  # asked for by get_peft_model(use_gradient_checkpointing=...)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "causal_lm":
                raise
            return getattr(self.causal_lm, name)

    # ------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutput:
        """Logits, and with labels transformers' loss (shifted, float32, mean over labels that
        are not -100). Positions count from 0 in every row, as in transformers' forward.
        Where Thrifty differs: a padding query (left padding) attends to itself alone, where
        transformers averages over every key; only the logits at padding positions differ,
        and so does a loss whose labels include the token right after left padding."""
        reject_unknown("model(...)", {k: v for k, v in kwargs.items() if k not in ("return_dict", "use_cache")},
                       "input_ids, attention_mask, labels, position_ids")
        model = self.causal_lm
        input_ids = input_ids.to(model.device)
        batch, length = input_ids.shape
        positions = (position_ids.to(model.device) if position_ids is not None else
                     torch.arange(length, device=model.device).expand(batch, -1))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keys = attention_mask.to(model.device).bool()
            mask = causal_mask(positions, length, model.config.sliding_window) & keys[:, None, None, :]
            mask |= torch.eye(length, dtype=torch.bool, device=model.device)  # a padding query sees itself: no NaN
        logits = model(input_ids, positions, mask)
        loss = None
        if labels is not None:  # transformers' ForCausalLMLoss: shift, float32, mean over labelled tokens
            targets = F.pad(labels.to(model.device), (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | BatchEncoding | None = None,
                 attention_mask: torch.Tensor | None = None, *, max_new_tokens: int | None = None,
                 max_length: int | None = None, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, num_return_sequences: int = 1, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, streamer: Any = None, seed: int | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """transformers' generate: rows of prompt (as given, padding included) + new ids,
        finished rows filled with pad_token_id. Greedy unless do_sample (then top_k 50 and
        temperature 1.0 by default, as transformers)."""
        reject_unknown("model.generate", {k: v for k, v in kwargs.items() if k not in ("use_cache",)},
                       "max_new_tokens, max_length, min_new_tokens, do_sample, temperature, top_p, top_k, min_p, "
                       "num_return_sequences, eos_token_id, pad_token_id, streamer")
        if isinstance(input_ids, dict):  # apply_chat_template(..., return_dict=True) passed whole
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if input_ids is None:
            raise ThriftyError("model.generate needs input_ids (e.g. **tokenizer(text, return_tensors='pt')).")
        input_ids = input_ids.cpu()
        mask = attention_mask.cpu().bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        prompts = [row[keep].tolist() for row, keep in zip(input_ids, mask)]
        new = max_new_tokens if max_new_tokens is not None else max((max_length or 20) - input_ids.shape[1], 1)
        sampling = (SamplingParams(temperature if temperature is not None else 1.0, 50 if top_k is None else top_k,
                                   1.0 if top_p is None else top_p, min_p or 0.0) if do_sample
                    else SamplingParams(0.0))
        stops = ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)) if eos_token_id is not None \
            else self.tokenizer.stop_token_ids
        pad = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        on_step: Any = None
        if streamer is not None:
            if len(prompts) * num_return_sequences != 1:
                raise ThriftyError("a streamer works on one row at a time, as in transformers; pass one prompt.")
            streamer.put(input_ids)

            def on_step(rows: list[int], tokens: list[int]) -> None:
                streamer.put(torch.tensor(tokens))
        was_training = self.causal_lm.training
        self.causal_lm.eval()
        try:
            tokens, _ = generate_tokens(self.causal_lm, prompts, max_new_tokens=new, sampling=sampling,
                                        num_return_sequences=num_return_sequences, seed=seed, stop_token_ids=stops,
                                        pad_token_id=pad, on_step=on_step, min_new_tokens=min_new_tokens)
        finally:
            self.causal_lm.train(was_training)
            if streamer is not None:
                streamer.end()
        width = max(len(t) for t in tokens)
        prefix = input_ids.repeat_interleave(num_return_sequences, dim=0)
        tail = torch.full((len(tokens), width), pad, dtype=torch.long)
        for row, ids in enumerate(tokens):
            tail[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return torch.cat([prefix, tail], dim=1)

    # ------------------------------------------------------------ PEFT
    def print_trainable_parameters(self) -> None:
        print(trainable_parameters(self.causal_lm))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        summary = trainable_parameters(self.causal_lm)
        return summary.trainable, summary.total

    def merge_and_unload(self) -> PreTrainedModel:
        """Fold the adapters into the base weights, in place (a quantized base is
        dequantized to do so, as PEFT does)."""
        merge_lora(self.causal_lm, dequantize=True)
        return self

    # ------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """A PEFT adapter directory when the model has LoRA adapters, else a Hugging Face
        model directory (with the tokenizer files)."""
        reject_unknown("save_pretrained", {k: v for k, v in kwargs.items() if k != "safe_serialization"})
        if has_lora(self.causal_lm):
            save_adapter(self.causal_lm, save_directory, self.name_or_path)
        else:
            save_hf_model(self.causal_lm, self.tokenizer, save_directory)

    def save_pretrained_merged(self, save_directory: str | Path, tokenizer: Any = None,
                               save_method: str = "merged_16bit", **kwargs: Any) -> None:
        """Unsloth's: "merged_16bit" writes a Hugging Face directory with the adapters merged
        (in float32 onto the unquantized base, then rounded once to bfloat16: Thrifty's 16-bit
        type); "lora" the PEFT adapter alone."""
        reject_unknown("save_pretrained_merged", {k: v for k, v in kwargs.items() if k != "safe_serialization"})
        if save_method == "lora":
            save_adapter(self.causal_lm, save_directory, self.name_or_path)
            return
        if save_method not in SAVE_METHODS:
            raise ThriftyError(f"save_method={save_method!r}: Thrifty writes {', '.join(SAVE_METHODS)}. For a 4-bit "
                               "model file use save_pretrained_gguf(..., quantization_method='q4_k_m') (llama.cpp, "
                               "Ollama); bitsandbytes' 4-bit checkpoints are not written here.")
        model = self._merged(torch.bfloat16)
        save_hf_model(model, thrifty_tokenizer(tokenizer) if tokenizer is not None else self.tokenizer, save_directory)

    def save_pretrained_gguf(self, save_directory: str | Path, tokenizer: Any = None,
                             quantization_method: str | list[str] = "fast_quantized", **kwargs: Any) -> list[Path]:
        """Unsloth's: GGUF files `<dir>/<dir name>.<TYPE>.gguf` (one per method) and an Ollama
        Modelfile for the first; Unsloth's names (not_quantized, fast_quantized, quantized)
        and llama.cpp's (f16, q8_0, q4_k_m, ...) both work."""
        reject_unknown("save_pretrained_gguf", kwargs)
        methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
        directory = Path(save_directory)
        model = self._merged(torch.float32)
        tok = thrifty_tokenizer(tokenizer) if tokenizer is not None else self.tokenizer
        paths = []
        for method in methods:
            kind = ALIASES.get(method, method)
            paths.append(export_gguf(model, tok, directory / f"{directory.name}.{kind.upper()}.gguf", kind))
        write_ollama_modelfile(paths[0], tok)
        return paths

    def _merged(self, dtype: torch.dtype) -> CausalLM:
        """A plain copy of the model to save: the adapters merged in float32 onto the base
        model as loaded from disk (not onto an NF4-rounded copy), rounded once to dtype."""
        if not has_lora(self.causal_lm):
            return self.causal_lm
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(self.causal_lm, tmp, self.name_or_path)
            model, _, _ = open_model(self.name_or_path, tmp, merge=True, dtype=dtype)
        return model


def thrifty_model(model: Any) -> CausalLM:
    """Thrifty's CausalLM behind either interface."""
    return model.causal_lm if isinstance(model, PreTrainedModel) else model
