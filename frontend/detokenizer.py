"""Incremental detokenization that never emits a broken character.

Decoding one token at a time is wrong twice over: a byte-level token may hold only part
of a multi-byte UTF-8 character, and tokenizers such as SentencePiece render a token
differently depending on what precedes it. So, like vLLM and TGI, each step decodes a
short window of recent tokens twice (without and with the new tokens) and emits only the
difference. Text that ends in U+FFFD (an incomplete character) is held back until the
tokens that complete it arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first new token, for spacing rules


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Feed generated token ids with `push`; each call returns the text that became final.

    `prefix_offset:read_offset` is the window already emitted (kept as context);
    tokens from `read_offset` on are not emitted yet.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the new complete text (may be empty while a character is split)."""
        self._ids.extend(token_ids)
        emitted, current = self._decode_window()
        if len(current) <= len(emitted) or current.endswith(REPLACEMENT_CHARACTER):
            return ""
        return self._advance(current[len(emitted):])

    def flush(self) -> str:
        """The text still held back, at the end of generation (a cut character shows as U+FFFD)."""
        emitted, current = self._decode_window()
        if len(current) <= len(emitted):
            return ""
        return self._advance(current[len(emitted):])

    def _decode_window(self) -> tuple[str, str]:
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        current = self._decode(self._ids[self._prefix_offset:])
        return emitted, current

    def _advance(self, text: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)
