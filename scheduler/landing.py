"""When an adapter's copy will have landed, and when the forward being built will start.

With overlap loading, a request whose adapter is being copied may join a forward before the
worker reports the copy finished: the worker orders the forward after the copy, layer by layer,
so the output is right whatever the timing. The timing decides who waits: a forward that
starts before the copy ends runs at the copy's pace and stalls every request in it. So the
scheduler predicts both ends and admits the request into the first forward predicted to start
once its copy has landed, instead of waiting to hear of the load (which costs one to two steps).

The predictions learn from what the scheduler sees: copies run one after another on the
worker's load stream at the bandwidth of the finished ones (their reports arrive after the
copy, so the estimate errs long: safe); forwards follow one another at the period between
their results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest observation in the moving averages
# A forward waits per layer on a copy still landing: its layer i, on the copy's layer i. A copy
# that ends up to half a step after the forward starts costs it no wait when the copy is the
# longer of the two (its last layers land while the forward is at its first ones), and at most
# the copy's length when it is the shorter.
LANDING_SLACK = 0.5  # of a step


@dataclass
class PlannedCopy:
    issued: float
    nbytes: int
    start: float
    end: float


@dataclass
class LoadClock:
    """Predicted end of each slot load, by adapter name."""

    bytes_per_s: float  # learned from finished loads; the first guess until one finishes
    stream_free_at: float = 0.0  # when the last predicted copy ends
    _copies: dict[str, PlannedCopy] = field(default_factory=dict)  # in the order they queued

    def started(self, name: str, nbytes: int, now: float) -> None:
        start = max(now, self.stream_free_at)
        self.stream_free_at = start + nbytes / self.bytes_per_s
        self._copies[name] = PlannedCopy(now, nbytes, start, self.stream_free_at)

    def finished(self, name: str, now: float) -> None:
        """Its report came: the bandwidth learns from it, and the copies queued behind it are
        planned again from now, when the stream was done with it at the latest. Otherwise a
        prediction that erred long (the first guess does) would push every later copy back."""
        copy = self._copies.pop(name, None)
        if copy is not None and now > copy.start:
            self.bytes_per_s += SMOOTHING * (copy.nbytes / (now - copy.start) - self.bytes_per_s)
        self.stream_free_at = min(self.stream_free_at, now)
        for queued in self._copies.values():
            queued.start = max(queued.issued, self.stream_free_at)
            queued.end = self.stream_free_at = queued.start + queued.nbytes / self.bytes_per_s

    def forget(self, name: str) -> None:
        """A load that failed or will not be predicted (read from disk while copied)."""
        self._copies.pop(name, None)

    def predicted_end(self, name: str) -> float | None:
        copy = self._copies.get(name)
        return None if copy is None else copy.end


@dataclass
class StepClock:
    """When the forward sent next will start on the worker: after those in flight."""

    period_s: float | None = None  # between consecutive results while the worker was busy
    last_result_at: float | None = None
    _busy: bool = False  # a forward was still in flight at the last result

    def result(self, now: float, still_in_flight: int) -> None:
        """A forward's result arrived, `still_in_flight` forwards behind it."""
        if self._busy and self.last_result_at is not None:
            gap = now - self.last_result_at
            self.period_s = gap if self.period_s is None else self.period_s + SMOOTHING * (gap - self.period_s)
        self._busy = still_in_flight > 0
        self.last_result_at = now

    def lands_in_time(self, copy_end: float, now: float, in_flight: int) -> bool:
        """Whether a forward sent now, behind `in_flight`, would meet a copy ending at `copy_end` without
        waiting for it (until a step has been timed, only a copy already done)."""
        slack = LANDING_SLACK * self.period_s if self.period_s is not None else 0.0
        return copy_end <= self.next_start(now, in_flight) + slack

    def next_start(self, now: float, in_flight: int) -> float:
        """The predicted start of a forward sent now behind `in_flight` forwards."""
        if in_flight == 0 or self.period_s is None or self.last_result_at is None:
            return now
        return max(now, self.last_result_at + in_flight * self.period_s)
