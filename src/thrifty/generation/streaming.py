"""Print a single completion to a terminal as it is generated."""

from __future__ import annotations

from typing import TextIO

from thrifty.model.tokenizer import Tokenizer


class TextStreamer:
    """Decodes the growing token list and writes only the new characters.

    Decoding the whole list each step (not token by token) keeps multi-byte characters
    that span tokens intact; a trailing U+FFFD means a character is still incomplete,
    so it waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.token_ids: list[int] = []
        self.printed = ""

    def on_step(self, rows: list[int], tokens: list[int]) -> None:
        self.token_ids.append(tokens[0])
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self, final_text: str) -> None:
        """Write what the final (stop-string trimmed) text adds, then end the line."""
        if final_text.startswith(self.printed):
            self.out.write(final_text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()
