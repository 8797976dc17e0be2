"""The tokenizer llama.cpp would use, rebuilt from a GGUF file's `tokenizer.*` metadata.

The vocabulary, merges (or SentencePiece scores), token types and pre-tokenizer name
become a Hugging Face `tokenizers` tokenizer with the same splitting rules, and the chat
template and special tokens a Thrifty Tokenizer.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from thrifty.errors import ThriftyError
from thrifty.formats.gguf_reader import metadata_value
from thrifty.model.tokenizer import Tokenizer, set_post_processor


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: Path) -> Tokenizer:
    """Rebuild the tokenizer llama.cpp would use from `tokenizer.*` GGUF metadata."""
    def meta(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"tokenizer.ggml.{key}", default)

    kind = meta("model")
    tokens = meta("tokens")
    if not tokens:
        raise ThriftyError(f"{path}: the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens); "
                           "use the model's Hugging Face directory instead.")
    token_types = meta("token_type") or [NORMAL] * len(tokens)
    pre = meta("pre")
    if kind == "gpt2":
        merges = meta("merges")
        if not merges:
            raise ThriftyError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges; "
                               "the file is incomplete. Re-convert or re-download it.")
        backend = _byte_level_bpe(tokens, token_types, merges, pre, path)
        default_add_bos = pre in _ADDS_BOS_PRE
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, meta("scores"), token_types, meta("add_space_prefix", True))
        default_add_bos = True
    else:
        raise ThriftyError(
            f"{path}: tokenizer type {kind!r} (tokenizer.ggml.model) is not supported; Thrifty rebuilds "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers. Use the model's Hugging Face "
            "directory instead."
        )
    eos = meta("eos_token_id")
    if eos is None:
        raise ThriftyError(f"{path}: tokenizer.ggml.eos_token_id is missing, so generation could not stop.")
    bos = meta("bos_token_id")
    add_bos = bool(meta("add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(meta("add_eos_token", False))
    set_post_processor(backend, bos if add_bos else None, eos if add_eos else None)
    extra_stops = [i for i in (meta("eot_token_id"), meta("eom_token_id")) if i is not None]
    chat_template = metadata_value(reader, "tokenizer.chat_template")
    if metadata_value(reader, "general.architecture") == "gemma3":
        # Some Gemma 3 conversions carry no template; turns end with <end_of_turn> either way
        # (llama.cpp stops on it by its text).
        chat_template = chat_template or GEMMA3_CHAT_TEMPLATE
        if "<end_of_turn>" in tokens:
            extra_stops.append(tokens.index("<end_of_turn>"))
    return Tokenizer(
        backend=backend,
        eos_token_id=eos,
        bos_token_id=bos,
        pad_token_id=meta("padding_token_id"),
        unk_token_id=meta("unknown_token_id"),
        chat_template=chat_template,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        stop_token_ids=extra_stops,
        source=str(path),
    )


# Gemma 3's chat template (its instruction-tuned models' tokenizer_config.json): a system
# message joins the first user turn; the assistant's role is "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits, by tokenizer.ggml.pre, as in llama.cpp's llama-vocab.cpp. We use
# the regexes of the original tokenizer.json files (llama.cpp rewrites (?i:...) groups
# by hand for its own regex engine; the Rust `tokenizers` engine runs the originals).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_GPT2_PRE = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "roberta-bpe",
             "jina-v1-en", "jina-v2-code", "jina-es", "jina-de", "exaone4", "mellum", "modern-bert")
# llama.cpp's STARCODER group: every digit on its own ("\p{N}"), then the GPT-2 regex.
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
               "jina-v5-nano")
_LLAMA3_SPLIT_PRE = _LLAMA3_PRE + ("dbrx", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "kormo", "f2llmv2")
_GPT4O_PRE = ("gpt-4o", "llama4", "minimax-m2")
# Pre-types for which llama.cpp adds BOS unless the file says otherwise...
_ADDS_BOS_PRE = _LLAMA3_PRE + ("tekken", "chameleon")
# ...and for which it takes a pre-token that is itself in the vocabulary whole, skipping
# merges (tokenizers' BPE ignore_merges, as in Llama 3's own tokenizer.json).
_IGNORE_MERGES_PRE = _LLAMA3_PRE + ("tekken",)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def pre_names() -> list[str]:
    """One llama.cpp pre-tokenizer type per distinct way of splitting text that
    `pre_tokenizer_for` builds, the most common first (what a GGUF writer picks from)."""
    return ["smollm", "gpt-2", "llama-bpe", "qwen2", "tekken", "gpt-4o", "default"]


def pre_tokenizer_for(pre: str | None, path: Path) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return gpt2
    if pre in _DIGITS_PRE:
        # Exactly the pre-tokenizer in SmolLM2's (and StarCoder's) own tokenizer.json.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _LLAMA3_SPLIT_PRE:
        return _split_then_bytes(_LLAMA3_SPLIT)
    if pre in _QWEN2_PRE:
        return _split_then_bytes(_QWEN2_SPLIT)
    if pre == "tekken":
        return _split_then_bytes(_TEKKEN_SPLIT)
    if pre in _GPT4O_PRE:
        return _split_then_bytes(_GPT4O_SPLIT)
    if pre in (None, "", "default"):
        # llama.cpp's fallback for files without a pre-type: four splits applied in turn.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[\p{P}\$\+<=>\^~\|]+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\p{N}+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[0-9][0-9][0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    warnings.warn(f"{path}: unknown pre-tokenizer type {pre!r} (tokenizer.ggml.pre); splitting text like GPT-2. "
                  "Token ids may differ from llama.cpp's for this model.", stacklevel=3)
    return gpt2


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_bpe(tokens: list[str], token_types: list[int], merges: list[str], pre: str | None,
                    path: Path) -> tokenizers.Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, token_types)):
        if not set(tok) <= alphabet and kind not in (CONTROL, USER_DEFINED):
            # convert_hf_to_gguf writes some tokens as raw text; the BPE model needs them
            # in the byte alphabet. Control and user-defined tokens stay raw: they are
            # matched whole in the input (as llama.cpp does), never built by merges.
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    pairs = []
    for m in merges:
        left, _, right = m.partition(" ")
        pairs.append((left, right))
    ignore = pre in _IGNORE_MERGES_PRE
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore))
    except Exception as e:  # tokenizers raises a bare Exception for merges that do not fit the vocabulary
        raise ThriftyError(f"{path}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({e}); "
                           "the file is damaged. Re-convert or re-download it.") from e
    # No normalizer, even for Qwen2 (whose tokenizer.json has NFC): llama.cpp and
    # transformers' GGUF loader apply none, and NFC text is unaffected either way.
    backend.pre_tokenizer = pre_tokenizer_for(pre, path)
    backend.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(backend, tokens, token_types)
    return backend


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (e.g. <|im_end|>) become special added tokens, user-defined ones
    (e.g. <think>) plain added tokens: both are matched whole in the text, like llama.cpp does."""
    control = [AddedToken(t, normalized=False, special=True)
               for t, k in zip(tokens, token_types) if k == CONTROL and t]
    user = [AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, token_types) if k == USER_DEFINED and t]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, token_types: list[int],
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """llama.cpp's SPM vocabulary as a byte-fallback BPE, built like transformers' LlamaTokenizer
    (what transformers itself does for these files): merges ranked by the merged token's
    score, unknown characters fall back to <0xNN> byte tokens, spaces are written as U+2581."""
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((t for t, k in zip(tokens, token_types) if k == UNKNOWN), None)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores),
                                              unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else []),
    ])
    _add_gguf_special_tokens(backend, tokens, token_types)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces is a merge, ranked by the merged
    token's score (sentencepiece merges the best-scoring pair first); ties broken as
    transformers' generate_merges breaks them, so both tokenize alike."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[str, str, float]] = []
    for tok, score in dict(zip(tokens, scores)).items():
        local = [(tok[:c], tok[c:]) for c in range(1, len(tok)) if tok[:c] in vocab and tok[c:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked += [(left, right, score) for left, right in local]
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, like sorted()
    return [(left, right) for left, right, _ in ranked]
