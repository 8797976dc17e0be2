"""A tokenizer that answers as a transformers tokenizer does, over Thrifty's Tokenizer.

Defaults follow transformers (5.x): calling it adds the model's special tokens,
`decode` keeps special tokens unless told otherwise, and `apply_chat_template` tokenizes
and returns a dict-like batch (`return_dict=True`) unless `tokenize=False`. Parity with
transformers' own tokenizer on the same files is tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from thrifty.compat.arguments import reject_unknown
from thrifty.errors import ThriftyError
from thrifty.model.tokenizer import Tokenizer

PADDING = (False, True, "longest", "max_length", "do_not_pad")


class BatchEncoding(dict):
    """transformers' BatchEncoding: a dict of input_ids / attention_mask that also reads
    as attributes and moves to a device with `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class PreTrainedTokenizer:
    """transformers' tokenizer interface over `tokenizer` (Thrifty's), which stays at `.thrifty`."""

    def __init__(self, tokenizer: Tokenizer, padding_side: str = "right", model_max_length: int = 2048) -> None:
        self.thrifty = tokenizer
        self.padding_side = padding_side
        self.model_max_length = model_max_length

    # ------------------------------------------------------------ attributes
    def __getattr__(self, name: str) -> Any:  # eos_token_id, chat_template, vocab_size, ...
        if name == "thrifty":
            raise AttributeError(name)
        return getattr(self.thrifty, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("pad_token", "pad_token_id"):  # `tokenizer.pad_token = tokenizer.eos_token`
            token_id = self.thrifty.token_to_id(value) if name == "pad_token" else value
            if token_id is None:
                raise ThriftyError(f"tokenizer.{name} = {value!r}: not a token of this vocabulary.")
            self.thrifty.pad_token_id = int(token_id)
        else:
            super().__setattr__(name, value)

    def __len__(self) -> int:
        return len(self.thrifty)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        if isinstance(tokens, str):
            return self.thrifty.token_to_id(tokens)
        return [self.thrifty.token_to_id(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str] | None:
        if isinstance(ids, int):
            return self.thrifty.id_to_token(ids)
        return [self.thrifty.id_to_token(int(i)) for i in ids]  # type: ignore[misc]

    def get_vocab(self) -> dict[str, int]:
        return self.thrifty.backend.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        reject_unknown("tokenizer.encode", kwargs)
        return self.thrifty.encode(text, add_special_tokens=add_special_tokens)

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True,
                 padding_side: str | None = None, **kwargs: Any) -> BatchEncoding:
        reject_unknown("tokenizer(...)", kwargs, "text, add_special_tokens, padding, truncation, max_length, "
                       "return_tensors ('pt'), return_attention_mask, padding_side")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.thrifty.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.model_max_length
            ids = [row[:limit] for row in ids]
        return self._batch(ids, single, padding, max_length, return_tensors, return_attention_mask, padding_side)

    def _batch(self, ids: list[list[int]], single: bool, padding: bool | str, max_length: int | None,
               return_tensors: str | None, return_attention_mask: bool, padding_side: str | None) -> BatchEncoding:
        if padding not in PADDING:
            raise ThriftyError(f"padding={padding!r}: use one of {PADDING}.")
        if return_tensors not in (None, "pt"):
            raise ThriftyError(f"return_tensors={return_tensors!r}: Thrifty returns PyTorch tensors ('pt') or lists "
                               "(None).")
        masks = [[1] * len(row) for row in ids]
        if padding not in (False, "do_not_pad"):
            width = max_length if padding == "max_length" and max_length else max(map(len, ids), default=0)
            side = padding_side or self.padding_side
            pad = self.thrifty.pad_token_id
            for row, mask in zip(ids, masks):
                fill = width - len(row)
                if side == "left":
                    row[:0], mask[:0] = [pad] * fill, [0] * fill
                else:
                    row.extend([pad] * fill)
                    mask.extend([0] * fill)
        if return_tensors == "pt":
            if len({len(row) for row in ids}) > 1:
                raise ThriftyError("rows of different lengths cannot make one tensor: pass padding=True.")
            out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        else:
            out = {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}
        if not return_attention_mask:
            del out["attention_mask"]
        return BatchEncoding(out)

    # ------------------------------------------------------------ decoding
    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False,
               **kwargs: Any) -> str:
        reject_unknown("tokenizer.decode", {k: v for k, v in kwargs.items() if k != "clean_up_tokenization_spaces"})
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):  # one token id, as transformers takes it
            ids = [ids]
        return self.thrifty.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False,
                     **kwargs: Any) -> list[str]:
        return [self.decode(row, skip_special_tokens, **kwargs) for row in sequences]

    # ------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: list[dict[str, Any]] | list[list[dict[str, Any]]], *,
                            tokenize: bool = True, add_generation_prompt: bool = False,
                            return_tensors: str | None = None, return_dict: bool = True, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None,
                            tools: list[dict[str, Any]] | None = None, **template_kwargs: Any,
                            ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        for unsupported in ("continue_final_message", "return_assistant_tokens_mask", "chat_template"):
            if template_kwargs.get(unsupported):
                raise ThriftyError(f"apply_chat_template: {unsupported} is not supported by Thrifty.")
        single = not conversation or isinstance(conversation[0], dict)
        conversations = [conversation] if single else conversation
        texts = [self.thrifty.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt,  # type: ignore[arg-type]
                                                  tools=tools, **template_kwargs) for c in conversations]
        if not tokenize:
            return texts[0] if single else texts
        # The template already holds every special token (as in transformers).
        ids = [self.thrifty.encode(t, add_special_tokens=False) for t in texts]
        if truncation and max_length:
            ids = [row[:max_length] for row in ids]
        batch = self._batch(ids, single, padding, max_length, return_tensors, True, None)
        return batch if return_dict else batch["input_ids"]

    # ------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> tuple[str, ...]:
        reject_unknown("tokenizer.save_pretrained", kwargs)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.thrifty.save(directory)
        return tuple(str(p) for p in sorted(directory.glob("tokenizer*")))


def thrifty_tokenizer(tokenizer: Any) -> Tokenizer:
    """Thrifty's Tokenizer behind either interface."""
    return tokenizer.thrifty if isinstance(tokenizer, PreTrainedTokenizer) else tokenizer
