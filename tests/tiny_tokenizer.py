"""A character-level tokenizer with a ChatML-style chat template that fits the tiny
test models' 97-token vocabulary, so trainers can run end to end on them in seconds."""

from __future__ import annotations

import string
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models

from thrifty.model.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0..5 (pad, bos, eos as BASE)
CHARS = list(string.ascii_lowercase + string.digits + " \n.,?!:+-*=\"'") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")[:8]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= 97
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return Tokenizer(backend=backend, eos_token_id=2, bos_token_id=1, pad_token_id=0, unk_token_id=5,
                     chat_template=CHAT_TEMPLATE, source="tiny tokenizer")


def save_tiny_model_dir(family: str, directory: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny random HF model of `family` plus the tiny tokenizer, as a model directory
    that both transformers and thrifty.load_model read. Returns the transformers model."""
    from tiny_models import save_hf_model

    reference = save_hf_model(family, directory, seed)
    make_tiny_tokenizer().save(directory)
    return reference
