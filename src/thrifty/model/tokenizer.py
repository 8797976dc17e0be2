"""Text <-> token ids, and chat templates.

A Hugging Face `tokenizers` tokenizer does the splitting and merging; the model's
jinja2 chat template, rendered the way transformers renders it, turns a list of
messages into a prompt. Both come from a Hugging Face model directory
(`from_hf_dir`) or are rebuilt from a GGUF file's metadata
(formats/gguf_tokenizer.py), and `save` writes a directory that transformers and
`from_hf_dir` both load.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors

from thrifty.errors import ThriftyError


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and chat template generation needs.

    `pad_token_id` falls back to `eos_token_id`. `stop_token_ids` ends up holding the
    eos id first, then every other id that ends a generation: ids passed in (e.g. from
    generation_config.json or GGUF's eot/eom ids) and the chat template's end-of-turn
    token, found by rendering a probe conversation.
    """

    backend: tokenizers.Tokenizer = field(repr=False)
    eos_token_id: int
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    chat_template: str | None = field(default=None, repr=False)
    add_bos_token: bool = False
    add_eos_token: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    source: str = "tokenizer"  # the file or directory it came from, for error messages

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        stops = [self.eos_token_id, *self.stop_token_ids]
        end_of_turn = self._template_end_of_turn_id()
        if end_of_turn is not None:
            stops.append(end_of_turn)
        self.stop_token_ids = list(dict.fromkeys(stops))

    # ------------------------------------------------------------ basics

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """At most this many bytes of text make one token: the longest vocabulary entry's
        UTF-8 length (a byte-level or metaspace entry is at least as long as its text)."""
        return max(len(token.encode("utf-8")) for token in self.backend.get_vocab())

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return None if self.pad_token_id is None else self.id_to_token(self.pad_token_id)

    @property
    def unk_token(self) -> str | None:
        return None if self.unk_token_id is None else self.id_to_token(self.unk_token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it (e.g. `<|im_start|>`) become
        their single ids, as in transformers. add_special_tokens adds bos/eos if the model does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # ------------------------------------------------------------ chat template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does. Extra kwargs reach the template
        (e.g. `enable_thinking=False` for Qwen3)."""
        if not self.chat_template:
            raise ThriftyError(
                f"{self.source}: this model has no chat template, so it cannot format chat messages. "
                "Pass plain text instead (--no-chat on the command line), or use an instruct/chat model."
            )
        for name in ("tokenize", "return_tensors", "return_dict"):
            if name in kwargs:  # would reach the template unused, and the caller would get text back
                raise ThriftyError(f"Tokenizer.apply_chat_template takes no {name}=: it returns the rendered text, "
                                   "as transformers' tokenize=False. Encode it with tokenizer.encode(text), or use "
                                   "thrifty.AutoTokenizer, whose apply_chat_template behaves as transformers'.")
        _check_messages(messages)
        template = _compile_template(self.chat_template)
        variables: dict[str, Any] = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token,
        }
        variables = {k: v for k, v in variables.items() if v is not None}
        variables.update(kwargs)  # caller's values win, as in transformers
        try:
            return template.render(messages=messages, tools=tools, documents=variables.pop("documents", None),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ThriftyError(f"{self.source}: the chat template rejected these messages: {e}") from e

    def _template_end_of_turn_id(self) -> int | None:
        """The special token the chat template puts after an assistant turn, e.g. `<|im_end|>`
        or `<|eot_id|>`: the model emits it to end its answer, so generation must stop there."""
        if not self.chat_template:
            return None
        probe = "THRIFTY_END_OF_TURN_PROBE"
        try:
            text = self.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                add_generation_prompt=False)
        except Exception:  # a template may insist on other roles; then there is nothing to learn
            return None
        at = text.rfind(probe)
        if at < 0:
            return None
        ids = self.encode(text[at + len(probe):].lstrip())
        if ids and ids[0] in self.special_token_ids():
            return ids[0]
        return None

    # ------------------------------------------------------------ loading and saving

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja and
        generation_config.json (the last three optional) from a model directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ThriftyError(
                f"{tok_file}: not found. Thrifty needs the 'fast' tokenizer file tokenizer.json; create it with "
                "transformers: AutoTokenizer.from_pretrained(<model>).save_pretrained(<this directory>)."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise ThriftyError(f"{tok_file}: could not be read as a tokenizers file ({e}). "
                               "Download or save it again.") from e
        config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        _add_missing_added_tokens(backend, config.get("added_tokens_decoder") or {})

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else backend.token_to_id(content)

        gen_eos = gen_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos = token_id("eos_token")
        if eos is None and gen_eos:
            eos = gen_eos[0]
        if eos is None:
            raise ThriftyError(f"{path / 'tokenizer_config.json'}: no usable 'eos_token' (the token that ends a "
                               "sequence). Add e.g. \"eos_token\": \"</s>\" with a token from tokenizer.json.")
        bos = token_id("bos_token")
        # Like transformers 5, tokenizer.json's post-processor decides whether bos/eos are
        # added; tokenizer_config.json's add_bos_token/add_eos_token are ignored.
        add_bos, add_eos = _post_processor_adds(backend, bos, eos)
        return cls(
            backend=backend,
            eos_token_id=eos,
            bos_token_id=bos,
            pad_token_id=token_id("pad_token"),
            unk_token_id=token_id("unk_token"),
            chat_template=_hf_chat_template(path, config),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            stop_token_ids=gen_eos,
            source=str(path),
        )

    def save(self, directory: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja.

        transformers' AutoTokenizer and `from_hf_dir` both load the result. The template
        goes in both tokenizer_config.json (older transformers and llama.cpp's converter
        read it there) and chat_template.jinja (what current transformers writes).
        add_bos_token/add_eos_token are informational (llama.cpp's converter reads them);
        transformers and `from_hf_dir` follow tokenizer.json's post-processor."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added,
            "chat_template": self.chat_template,
        }
        config = {k: v for k, v in config.items() if v is not None}
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")


# ---------------------------------------------------------------- chat template helpers


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates
    (for transformers' assistant masks); rendering just emits the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON, as transformers gives them.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers builds: templates come from model files, so sandboxed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ThriftyError(f"chat template line {e.lineno}: syntax error: {e.message}") from e


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ThriftyError(f"chat messages must be a list of dicts, got {type(messages).__name__}.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ThriftyError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__}.")
        if "role" not in m:
            raise ThriftyError(f"chat message {i} has no 'role' (e.g. 'user', 'assistant', 'system'): {m!r}")
        # An assistant turn that only calls tools legitimately has no content.
        if "content" not in m and "tool_calls" not in m:
            raise ThriftyError(f"chat message {i} (role {m['role']!r}) has no 'content': {m!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ThriftyError(f"chat message {i} (role {m['role']!r}) has content of type "
                               f"{type(content).__name__}; it must be a string (or a list of text parts).")


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template


# ---------------------------------------------------------------- Hugging Face directory helpers


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ThriftyError(f"{file}: line {e.lineno}: invalid JSON ({e.msg}). Fix or re-download it.") from e
    if not isinstance(data, dict):
        raise ThriftyError(f"{file}: expected a JSON object at the top level.")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or serialized AddedTokens."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


def _add_missing_added_tokens(backend: tokenizers.Tokenizer, decoder: dict[str, Any]) -> None:
    """tokenizer_config.json's added_tokens_decoder may list tokens tokenizer.json lacks."""
    special, normal = [], []
    for entry in decoder.values():
        content = _token_content(entry)
        if content is None or backend.token_to_id(content) is not None:
            continue
        token = AddedToken(content, single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", False),
                           special=entry.get("special", False))
        (special if token.special else normal).append(token)
    if special:
        backend.add_special_tokens(special)
    if normal:
        backend.add_tokens(normal)


def _post_processor_adds(backend: tokenizers.Tokenizer, bos: int | None, eos: int) -> tuple[bool, bool]:
    """Whether encoding with special tokens adds bos / eos, found by trying it."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    adds_eos = len(full) > len(plain) and full[-1] == eos
    return adds_bos, adds_eos


def set_post_processor(backend: tokenizers.Tokenizer, bos: int | None, eos: int | None) -> None:
    """bos/eos added by encode(add_special_tokens=True); the layout transformers builds."""
    if bos is None and eos is None:
        backend.post_processor = None
        return
    specials = [(backend.id_to_token(i), i) for i in (bos, eos) if i is not None]
    bos_s = [f"{backend.id_to_token(bos)}:0"] if bos is not None else []
    eos_s = [f"{backend.id_to_token(eos)}:0"] if eos is not None else []
    bos_p = [f"{backend.id_to_token(bos)}:1"] if bos is not None else []
    eos_p = [f"{backend.id_to_token(eos)}:1"] if eos is not None else []
    single = [*bos_s, "$A:0", *eos_s]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=[*single, *bos_p, "$B:1", *eos_p], special_tokens=specials)
