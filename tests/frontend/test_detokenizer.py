"""Incremental detokenization: complete characters only, spacing from context, special tokens skipped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from frontend.detokenizer import IncrementalDetokenizer
from loraserve.demo import EOS_ID, build_tokenizer

MULTILINGUAL = "héllo wörld 🙂 日本"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The demo's byte-level BPE: a multi-byte character is several tokens."""
    directory: Path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory, max_length=64)
    return AutoTokenizer.from_pretrained(directory)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detokenizer: IncrementalDetokenizer, token_ids: Sequence[int]) -> list[str]:
    return [detokenizer.push([token]) for token in token_ids]


def test_multi_byte_characters_are_emitted_only_when_complete(tokenizer):
    token_ids = encode(tokenizer, MULTILINGUAL)
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert "".join(deltas) == MULTILINGUAL
    assert not any("\ufffd" in delta for delta in deltas)
    assert "🙂" in deltas and "日" in deltas and "本" in deltas  # each appears whole, once its last byte is in
    assert deltas.count("") >= len("🙂".encode()) - 1 + 2 * (len("日".encode()) - 1)


def test_text_continues_from_the_prompt(tokenizer):
    prompt = tokenizer.encode("Hello")  # with <s>, which is skipped
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), encode(tokenizer, " wörld, again"))
    assert "".join(deltas) == " wörld, again"


def test_several_tokens_at_once(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(encode(tokenizer, MULTILINGUAL)) == MULTILINGUAL
    assert detokenizer.flush() == ""


def test_special_tokens_are_skipped(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(encode(tokenizer, "ok")) == "ok"
    assert detokenizer.push([EOS_ID]) == ""
    assert detokenizer.flush() == ""


def test_flush_shows_a_character_cut_by_the_end_of_generation(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    first_two_bytes = encode(tokenizer, "日")[:2]
    assert stream(detokenizer, first_two_bytes) == ["", ""]
    assert detokenizer.flush() == "\ufffd"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab éö日本🙂\n,.")), min_size=1, max_size=24),
       cuts=st.lists(st.integers(min_value=1, max_value=5), max_size=24))
def test_any_chunking_reproduces_the_text(tokenizer, text, cuts):
    token_ids = encode(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"))
    deltas, start = [], 0
    for size in [*cuts, len(token_ids)]:
        deltas.append(detokenizer.push(token_ids[start:start + size]))
        start += size
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.flush() == text


class SentencePieceLike:
    """Decodes like SentencePiece: '▁' is a space, and the text's leading space is dropped."""

    pieces: ClassVar[dict[int, str]] = {0: "<s>", 1: "▁Hello", 2: "▁world", 3: "!", 4: "▁again"}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join(self.pieces[t] for t in token_ids if not (skip_special_tokens and t == 0))
        return text.replace("▁", " ").removeprefix(" ")


def test_prompt_context_keeps_the_space_before_a_word():
    detokenizer = IncrementalDetokenizer(SentencePieceLike(), prompt_ids=[0, 1])
    assert stream(detokenizer, [2, 3, 4]) == [" world", "!", " again"]


def test_text_at_the_very_start_has_no_leading_space():
    assert stream(IncrementalDetokenizer(SentencePieceLike()), [1, 2]) == ["Hello", " world"]
