"""The Hugging Face tokenizer, as the frontend uses it: prompts in, output text out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor


class PromptTokenizer:
    """Encodes prompts on one worker thread, decodes on the caller's.

    A long prompt must not stall other requests' streams on the event loop, and one thread
    is enough: encoding is fast, and a fast tokenizer is not meant to be shared by several
    threads that might reconfigure it.
    """

    def __init__(self, path: str) -> None:
        # Imported here: transformers takes seconds to import, and a server without a
        # tokenizer should not pay for it.
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the model expects (such as BOS)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._tokenizer.encode, text)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the reply.

        Raises ValueError when the tokenizer has no chat template.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode_chat, messages)

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self._tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tokenizer.encode(text, add_special_tokens=False)  # the template writes its own

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [str(token) for token in self._tokenizer.convert_ids_to_tokens(list(token_ids))]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
