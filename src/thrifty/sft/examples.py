"""SFT examples: a row -> token ids with loss labels.

`tokenize_example` / `tokenize_dataset` turn a row into input_ids and labels, in one of
four formats told apart by their columns: `text`; `prompt` + `completion`; chat
`messages`; Alpaca `instruction` (+ `input`) + `output`. Chat-shaped rows go through the
model's chat template; labels are -100 wherever there is no loss, aligned with input_ids
as in Hugging Face (labels[i] is input_ids[i] or -100); sft/batches.py shifts them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from thrifty.errors import ThriftyError
from thrifty.model.tokenizer import Tokenizer
from thrifty.sft.config import FORMATS
from thrifty.training.rows import is_blank, json_type, row_location

IGNORE_INDEX = -100

Format = Literal["text", "prompt_completion", "messages", "alpaca"]
Truncation = Literal["error", "truncate", "drop"]

# ---------------------------------------------------------------- formats

_NEEDS = {"text": "'text'", "prompt_completion": "'prompt' and 'completion'", "messages": "'messages'",
          "alpaca": "'instruction' and 'output' (and optionally 'input'), or 'input' and 'output'"}


def detect_format(row: dict[str, Any], where: str = "row") -> Format:
    """The format a row's columns imply; the first match of messages, prompt/completion,
    text, Alpaca (so extra columns such as an 'answer' for rewards do no harm)."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:  # before Alpaca, as TRL reads a `text` column made from other columns
        return "text"
    if {"instruction", "output"} <= keys or {"input", "output"} <= keys:  # the second: Unsloth's style
        return "alpaca"
    raise ThriftyError(
        f"{where}: cannot tell the data format from the columns {sorted(keys)}. Provide 'text'; or 'prompt' + "
        "'completion'; or 'messages' (a list of {role, content}); or Alpaca 'instruction' (+ 'input') + 'output' "
        "(or 'input' + 'output'). "
        "Rename the columns, or set format to one of " + ", ".join(FORMATS) + "."
    )


def _text_field(row: dict[str, Any], name: str, fmt: str, where: str, optional: bool = False) -> str | None:
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise ThriftyError(f"{where}: missing field '{name}' (the {fmt} format needs {_NEEDS[fmt]}).")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. "completion": 84 in an arithmetic data set
    if not isinstance(value, str):
        raise ThriftyError(f"{where}: field '{name}' must be a string, got {json_type(value)}.")
    return value


def _messages_field(value: Any, name: str, where: str) -> list[dict[str, Any]]:
    """A list of {role, content} dicts; CSV cells hold it as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ThriftyError(f"{where}: field '{name}' is a string that is not a JSON list of messages "
                               f"({e.msg}).") from e
    if not isinstance(value, list) or not value:
        raise ThriftyError(f"{where}: field '{name}' must be a non-empty list of {{\"role\", \"content\"}} "
                           f"messages, got {json_type(value) if value != [] else 'an empty list'}.")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ThriftyError(f"{where}: {name}[{j}] must be an object with 'role' and 'content', "
                               f"got {json_type(m)}.")
        if not isinstance(m.get("role"), str):
            raise ThriftyError(f"{where}: {name}[{j}] has no 'role' (e.g. \"user\", \"assistant\", \"system\").")
        if m["role"] not in ROLES:
            raise ThriftyError(f"{where}: {name}[{j}] has role {m['role']!r}; chat templates know "
                               f"{', '.join(repr(r) for r in ROLES)}. Rename it (a typo would otherwise be "
                               "trained on as if it were a known turn).")
        content = m.get("content")
        if content is None and "tool_calls" not in m:
            raise ThriftyError(f"{where}: {name}[{j}] (role {m['role']!r}) has no 'content'.")
        if content is not None and not isinstance(content, str) and not _is_text_parts(content):
            raise ThriftyError(f"{where}: {name}[{j}] (role {m['role']!r}) has 'content' {json_type(content)}; "
                               "it must be a string (or a list of {\"type\": \"text\", \"text\": ...} parts).")
    return value


# The roles of the chat templates Thrifty's model families ship.
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")


def _is_text_parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content)


# ---------------------------------------------------------------- tokenizing


@dataclass
class TokenizedExample:
    """One training sequence. labels[i] is input_ids[i] where the model is trained to
    produce that token, IGNORE_INDEX (-100) where it is not (unshifted, as in HF)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_example(
    row: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    format: Format | None = None,
    completion_only_loss: bool = True,
    truncation: Literal["error", "truncate"] = "error",
    where: str = "row",
) -> TokenizedExample:
    """Token ids and labels for one row (`where` names it in errors).

    text: BOS (if the tokenizer adds one) + text + EOS, loss on every token.
    prompt/completion, Alpaca: a user turn and an assistant turn rendered with the chat
    template (Alpaca's user turn is instruction + "\\n\\n" + input); prompt and completion
    may also be lists of messages (TRL's conversational form). Without a chat template,
    prompt + completion + EOS are concatenated.
    messages: the whole conversation through the chat template.
    completion_only_loss: loss only on assistant turns (and the completion), each including
    its end-of-turn token so the model learns to stop; False trains on every token.
    A sequence longer than max_length raises, or is cut to max_length with truncation="truncate".
    """
    return _fit(_tokenize(row, tokenizer, format, completion_only_loss, where), max_length, truncation, where)


def _tokenize(row: dict[str, Any], tokenizer: Tokenizer, format: Format | None, completion_only_loss: bool,
              where: str) -> TokenizedExample:
    fmt = format or detect_format(row, where)
    if fmt not in FORMATS:
        raise ThriftyError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if fmt == "text":
        ids = tokenizer.encode(_text_field(row, "text", fmt, where), add_special_tokens=True)  # type: ignore[arg-type]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)  # so the model learns where a document ends
        return TokenizedExample(ids, list(ids))
    messages, first_trainable = _as_conversation(row, fmt, where)
    if tokenizer.chat_template is None and fmt != "messages" and _is_plain_pair(messages):
        example = _plain_pair(messages[0]["content"], messages[1]["content"], tokenizer)
    else:
        example = _encode_segments(_chat_segments(messages, first_trainable, tokenizer, where), tokenizer)
    if not completion_only_loss:
        example.labels = list(example.input_ids)
    return example


def tokenize_dataset(
    rows: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    format: Format | None = None,
    completion_only_loss: bool = True,
    truncation: Truncation = "error",
) -> list[TokenizedExample]:
    """tokenize_example over every row. The format is detected from the first row unless
    given. truncation="drop" skips rows longer than max_length (with a warning)."""
    if truncation not in ("error", "truncate", "drop"):
        raise ThriftyError(f"truncation must be 'error', 'truncate' or 'drop', got {truncation!r}.")
    if not rows:
        raise ThriftyError("the data set is empty: nothing to tokenize.")
    fmt = format or detect_format(rows[0], row_location(rows, 0))
    examples, dropped, unlabelled, empty = [], 0, 0, []
    for i, row in enumerate(rows):
        where = row_location(rows, i)
        if _answer_is_empty(row, fmt):
            empty.append(where)
            continue
        if truncation != "truncate" and _certainly_too_long(row, fmt, tokenizer, max_length, truncation, where):
            dropped += 1
            continue
        example = _tokenize(row, tokenizer, fmt, completion_only_loss, where)
        if len(example) > max_length and truncation == "drop":
            dropped += 1
            continue
        example = _fit(example, max_length, truncation, where)
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            unlabelled += 1
        examples.append(example)
    if empty:
        what = f"{len(empty)} of {len(rows)} rows have an empty {_ANSWER[fmt]}"
        if len(empty) == len(rows):
            raise ThriftyError(f"{what}: nothing to train on ({', '.join(empty[:5])}). Fill in the {_ANSWER[fmt]}s.")
        warnings.warn(f"skipped {what}, which would teach only the end of the turn: "
                      f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}.", stacklevel=2)
    if dropped:
        warnings.warn(f"skipped {dropped} of {len(rows)} examples longer than max_length={max_length} tokens.",
                      stacklevel=2)
    if not examples:
        raise ThriftyError(f"every example is longer than max_length={max_length} tokens; raise max_length.")
    if unlabelled:
        warnings.warn(f"{unlabelled} of {len(examples)} examples have no tokens to learn from (the completion was "
                      f"truncated away?); raise max_length to keep them useful.", stacklevel=2)
    return examples


def _certainly_too_long(row: dict[str, Any], fmt: str, tokenizer: Tokenizer, max_length: int, truncation: str,
                        where: str) -> bool:
    """A row with more characters than max_length tokens can stand for (4x margin, for
    normalizers that shorten text) is too long whatever its tokenization: told without
    tokenizing it (a 50 MB row took 89 s to tokenize before it was refused). Raises for
    truncation='error'; True means drop it."""
    if fmt == "text":
        texts = [row.get("text")]
    else:
        texts = [message.get("content") for message in _as_conversation(row, fmt, where)[0]]
    size = sum(len(text) for text in texts if isinstance(text, str))
    most = 4 * max_length * tokenizer.longest_token_bytes
    if size <= most:
        return False
    if truncation == "error":
        raise ThriftyError(f"{where}: the example holds {size:,} characters, far more than max_length={max_length} "
                           f"tokens can hold (one token is at most {tokenizer.longest_token_bytes} bytes). Remove or "
                           "split that row, or set truncation='truncate' to cut long examples or truncation='drop' "
                           "to skip them.")
    return True


# What a row teaches, per format: a row whose answer is blank trains only the end of turn.
_ANSWER = {"text": "text", "prompt_completion": "completion", "messages": "assistant turn", "alpaca": "output"}


def _answer_is_empty(row: dict[str, Any], fmt: str) -> bool:
    """Whether the row's answer (see _ANSWER) is empty or whitespace; a missing or mistyped
    one is left to the tokenizer's own errors."""
    if fmt == "text":
        return is_blank(row.get("text"))
    if fmt == "alpaca":
        return is_blank(row.get("output"))
    answer = row.get("messages" if fmt == "messages" else "completion")
    if isinstance(answer, list):
        turns = [m.get("content") for m in answer if isinstance(m, dict) and m.get("role") == "assistant"]
        return bool(turns) and all(is_blank(content) for content in turns)
    return is_blank(answer)


def _as_conversation(row: dict[str, Any], fmt: str, where: str) -> tuple[list[dict[str, Any]], int]:
    """The row as chat messages, and the index of the first message that may be trained
    on: every assistant turn of a chat, only the completion of a prompt/completion pair."""
    if fmt == "messages":
        if row.get("messages") is None:
            raise ThriftyError(f"{where}: missing field 'messages' (the messages format needs {_NEEDS[fmt]}).")
        return _messages_field(row["messages"], "messages", where), 0
    if fmt == "alpaca":
        if "instruction" in row:
            instruction = _text_field(row, "instruction", fmt, where)
            extra = _text_field(row, "input", fmt, where, optional=True)
            user = f"{instruction}\n\n{extra}" if extra else instruction
        else:  # input + output: the input is the whole user turn
            user = _text_field(row, "input", fmt, where)
        output = _text_field(row, "output", fmt, where)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], 1
    pair = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(name)
        if isinstance(value, list):
            pair.append(_messages_field(value, name, where))
        else:
            pair.append([{"role": role, "content": _text_field(row, name, fmt, where)}])
    return pair[0] + pair[1], len(pair[0])


def _is_plain_pair(messages: list[dict[str, Any]]) -> bool:
    return [m["role"] for m in messages] == ["user", "assistant"]


def _plain_pair(prompt: str, completion: str, tokenizer: Tokenizer) -> TokenizedExample:
    """A base model without a chat template: prompt then completion + EOS, tokenized apart
    so the prompt's tokens are exactly those the model will see at generation time."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id and tokenizer.add_eos_token:
        prompt_ids.pop()
    completion_ids = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    return TokenizedExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except ThriftyError:
        return None  # e.g. a template that rejects an empty or user-less prefix


def _chat_segments(messages: list[dict[str, Any]], first_trainable: int, tokenizer: Tokenizer,
                   where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces; trained pieces are the
    assistant turns at or after `first_trainable`, from after the turn's header (what the
    generation prompt adds) to the end of its rendering.

    Each turn's span comes from rendering the conversation incrementally, so no
    template-specific markers are parsed: the turn starts where render(messages[:i],
    add_generation_prompt=True) ends and ends where render(messages[:i+1]) ends. Templates
    whose earlier turns change once later ones follow (Qwen3 drops old reasoning) fail that
    prefix test; then the message content is located in the full rendering instead."""
    try:
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    except ThriftyError as e:
        raise ThriftyError(f"{where}: {e}") from e
    stop_strings = [s for s in (tokenizer.id_to_token(i) for i in tokenizer.stop_token_ids) if s]
    segments: list[tuple[str, bool]] = []
    cursor = 0
    trainable = [i for i, m in enumerate(messages) if i >= first_trainable and m["role"] == "assistant"]
    if not trainable:
        raise ThriftyError(f"{where}: the conversation has no assistant message, so there is nothing to learn; "
                           "add the assistant's reply.")
    for i in trainable:
        head = _render(tokenizer, messages[:i], True) if i > 0 else None
        turn = _render(tokenizer, messages[: i + 1], False)
        if head is not None and turn is not None and turn.startswith(head) and full.startswith(turn) \
                and cursor <= len(head):
            start, end = len(head), len(turn)
        else:
            start, end = _find_turn(full, messages[i], cursor, stop_strings, where, i)
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [s for s in segments if s[0]]


def _find_turn(full: str, message: dict[str, Any], cursor: int, stop_strings: list[str], where: str,
               index: int) -> tuple[int, int]:
    content = message.get("content")
    start = full.find(content, cursor) if isinstance(content, str) and content else -1
    if start < 0:
        raise ThriftyError(f"{where}: cannot find assistant message {index} in the chat template's rendering of the "
                           "conversation, so its loss mask is unknown. Use a template that renders each "
                           "assistant message's content verbatim.")
    end = start + len(content)
    for stop in stop_strings:
        if full.startswith(stop, end):
            return start, end + len(stop)
    return start, end


def _encode_segments(segments: list[tuple[str, bool]], tokenizer: Tokenizer) -> TokenizedExample:
    """Tokenize piece by piece (no BOS/EOS: the template writes its own), as a generation
    prompt is tokenized apart from the reply. A trained piece is labelled up to and including
    its first end-of-turn token; what the template puts after it (ChatML's newline) is
    never generated, so it gets no loss."""
    stops = set(tokenizer.stop_token_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer.encode(text)
        input_ids += ids
        if trained:
            cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            labels += ids[:cut] + [IGNORE_INDEX] * (len(ids) - cut)
        else:
            labels += [IGNORE_INDEX] * len(ids)
    return TokenizedExample(input_ids, labels)


def _fit(example: TokenizedExample, max_length: int, truncation: str, where: str) -> TokenizedExample:
    if len(example) <= max_length:
        return example
    if truncation == "truncate":
        return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
    if truncation != "error":
        raise ThriftyError(f"truncation must be 'error' or 'truncate', got {truncation!r}.")
    raise ThriftyError(
        f"{where}: the example is {len(example)} tokens long, more than max_length={max_length}. "
        f"Raise max_length (to at least {len(example)}), or set truncation='truncate' to cut long examples "
        "or truncation='drop' to skip them."
    )
