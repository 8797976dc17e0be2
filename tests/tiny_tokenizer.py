"""A character-level tokenizer with a ChatML-style chat template that fits the tiny
test models' 97-token vocabulary, so trainers can run end to end on them in seconds;
and a byte-level BPE one (the kind GGUF files hold) for tiny models of 300 tokens; and
SFT rows written in the character-level one's alphabet."""

from __future__ import annotations

import string
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from thrifty.model.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0..5 (pad, bos, eos as BASE)
CHARS = list(string.ascii_lowercase + string.digits + " \n.,?!:+-*=\"'") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")[:8]
WORDS = ["red", "blue", "green", "one", "two", "three", "sun", "moon", "stone", "river"]
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


BYTE_LEVEL_VOCAB = 300  # 256 byte tokens, merges, three specials
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE small enough for the tiny models."""
    byte_symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + \
        [chr(c) for c in range(174, 256)]
    byte_symbols += [chr(256 + i) for i in range(256 - len(byte_symbols))]
    vocab = {s: i for i, s in enumerate(byte_symbols)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("1", "2")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BYTE_LEVEL_SPECIALS])
    ids = {t: backend.token_to_id(t) for t in BYTE_LEVEL_SPECIALS}
    assert max(ids.values()) < BYTE_LEVEL_VOCAB
    return Tokenizer(backend=backend, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                     chat_template=CHAT_TEMPLATE.replace("</s>", "<|im_end|>"), source="tiny byte-level tokenizer")


def tiny_byte_level_model(family: str, directory: Path):  # type: ignore[no-untyped-def]
    """Our fp32 model of a tiny random `family` model with the byte-level tokenizer (the
    kind GGUF files hold), saved in `directory`."""
    from thrifty.formats.loader import load_model
    from tiny_models import make_hf_model

    # Rows a multiple of 256 wide (the intermediate size): the K-quants' blocks divide them.
    make_hf_model(family, vocab_size=BYTE_LEVEL_VOCAB, bos_token_id=None, eos_token_id=263, pad_token_id=263,
                  intermediate_size=256).save_pretrained(directory)
    byte_level_tokenizer().save(directory)
    return load_model(directory, dtype="float32", device="cpu")


def tiny_sft_rows(n: int = 24) -> list[dict]:
    """prompt/completion rows of varied lengths, in the tiny tokenizer's alphabet."""
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        completion = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + (i * 7) % 5))
        rows.append({"prompt": f"say {prompt}", "completion": completion})
    return rows
