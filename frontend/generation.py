"""Turns the scheduler's token outputs for one request into the client's messages."""

from __future__ import annotations

from collections.abc import Sequence

from frontend.detokenizer import IncrementalDetokenizer, TokenDecoder
from frontend.stop_strings import StopStringMatcher
from protos.loraserve.v1 import internal_pb2, serving_pb2


class OutputAssembler:
    """Per request: detokenizes new tokens, applies stop strings and marks the finish.

    `add` maps one scheduler output to one stream message. When a stop string appears the
    message is final (`stopped_by_string`): its text ends before the stop string, its
    tokens end with the one that completed it, and the caller must abort the request at
    the scheduler, which does not know about stop strings.
    """

    def __init__(self, request_id: str, prompt_ids: Sequence[int], tokenizer: TokenDecoder | None,
                 stop_strings: Sequence[str]) -> None:
        self._request_id = request_id
        self._prompt_tokens = len(prompt_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stops = StopStringMatcher(stop_strings) if stop_strings else None
        self.completion_tokens = 0
        self.finished = False

    @property
    def stopped_by_string(self) -> bool:
        return self._stops is not None and self._stops.stopped

    def add(self, output: internal_pb2.RequestOutput) -> serving_pb2.GenerateStreamResponse:
        chunk = serving_pb2.GenerateStreamResponse(request_id=self._request_id)
        for index, token in enumerate(output.token_ids):
            chunk.token_ids.append(token)
            if index < len(output.logprobs):
                chunk.logprobs.append(output.logprobs[index])
            self.completion_tokens += 1
            chunk.text += self._text_after(token)
            if self.stopped_by_string:
                self._finish(chunk, "stop", output)
                return chunk
        if output.finished:
            chunk.text += self._remaining_text()
            self._finish(chunk, "stop" if self.stopped_by_string else output.finish_reason, output)
        return chunk

    def _text_after(self, token: int) -> str:
        delta = self._detokenizer.push([token]) if self._detokenizer is not None else ""
        return self._stops.feed(delta).text if self._stops is not None else delta

    def _remaining_text(self) -> str:
        """At the end: the detokenizer's held-back text, then the stop matcher's."""
        if self._detokenizer is None:
            return ""
        delta = self._detokenizer.flush()
        if self._stops is None:
            return delta
        return self._stops.feed(delta).text + self._stops.flush()

    def _finish(self, chunk: serving_pb2.GenerateStreamResponse, reason: str,
                output: internal_pb2.RequestOutput) -> None:
        self.finished = True
        chunk.finished = True
        chunk.finish_reason = reason
        chunk.usage.prompt_tokens = self._prompt_tokens
        chunk.usage.completion_tokens = self.completion_tokens
        if output.HasField("timing"):
            chunk.timing.CopyFrom(output.timing)


def accumulate(response: serving_pb2.GenerateResponse, chunk: serving_pb2.GenerateStreamResponse) -> None:
    """Adds one stream message to a unary response."""
    response.request_id = chunk.request_id
    response.text += chunk.text
    response.token_ids.extend(chunk.token_ids)
    response.logprobs.extend(chunk.logprobs)
    if chunk.finished:
        response.finish_reason = chunk.finish_reason
        response.usage.CopyFrom(chunk.usage)
        response.timing.CopyFrom(chunk.timing)
