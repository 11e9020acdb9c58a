"""When an adapter's copy will have landed, and when the forward being built will start and end.

With overlap loading, a request whose adapter is being copied may join a forward before the
worker reports the copy finished: the worker orders the forward after the copy, layer by layer,
so the output is right whatever the timing. The timing decides who waits: a forward whose
layers overtake the copy's runs at the copy's pace and stalls every request in it. So the
scheduler predicts both and admits the request into the first forward predicted to meet the
copy without waiting, instead of waiting to hear of the load (which costs one to two steps).

The predictions learn from what the scheduler sees: copies run one after another on the
worker's load stream at the bandwidth of the finished ones, as the worker timed them on the
GPU (a report reaches the scheduler with the next forward's result, up to a step after the
copy: timed by its arrival, a 26 ms copy looked a third longer and its requests joined a
forward a step late); a decode step's time and a prompt forward's (a line over its tokens)
come from the spacing of results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest observation in the moving averages
LINE_SMOOTHING = 0.1  # the same for the line of a prompt forward's time: two parameters want more points
# A forward waits per layer on a copy still landing: its layer i on the copy's layer i. So it may
# start before the copy ends by as much as the shorter of the two lasts and wait for nothing: a
# forward shorter than the copy runs its last layer as the copy's last lands, one longer than
# the copy falls behind the copy from its first layer on. A share of that margin is used, for
# the predictions' error (a copy that lands late stalls every request in the forward).
LANDING_OVERLAP = 0.75
# A forward may wait up to this share of a step for a short copy: the request it brings saves a
# whole step, its other members lose this much.
LANDING_STALL = 0.5
# An adapter's copy kept its pace when it ran at this share of the learned bandwidth or better.
PACE_KEPT = 0.5


@dataclass
class PlannedCopy:
    issued: float
    nbytes: int
    start: float
    end: float
    seen_at: float | None = None  # the last report of its progress
    seen_landed: float = 0.0  # the share of its layers landed then
    kept_pace_before: bool = False  # the adapter's last timed copy kept the learned pace

    def projected_end(self) -> float | None:
        """Its end at the pace the last report showed since its planned start; None until a
        report since then shows a layer landed. Until then nothing says the copy is not far
        slower than planned (a contended link), and a forward joining it would wait on it with
        every request in it. A copy that waited for its slot's last readers started after its
        plan, so the projection errs late: safe."""
        if self.seen_at is None or self.seen_at <= self.start or self.seen_landed <= 0.0:
            return None
        return self.start + (self.seen_at - self.start) / self.seen_landed


@dataclass
class LoadClock:
    """Predicted end of each slot load, by adapter name."""

    bytes_per_s: float  # learned from finished loads; the first guess until one finishes
    stream_free_at: float = 0.0  # when the last predicted copy ends
    _copies: dict[str, PlannedCopy] = field(default_factory=dict)  # in the order they queued
    _kept_pace: set[str] = field(default_factory=set)  # adapters whose last timed copy kept the pace

    def started(self, name: str, nbytes: int, now: float) -> None:
        start = max(now, self.stream_free_at)
        self.stream_free_at = start + nbytes / self.bytes_per_s
        self._copies[name] = PlannedCopy(now, nbytes, start, self.stream_free_at,
                                         kept_pace_before=name in self._kept_pace)

    def finished(self, name: str, now: float, copy_s: float = 0.0) -> None:
        """Its report came: the bandwidth learns from the copy's own time as the worker timed it
        (`copy_s`; else from the time since its predicted start, which counts the wait for the
        report), and the copies queued behind it are planned again from now, when the stream was
        done with it at the latest. Otherwise a prediction that erred long (the first guess
        does) would push every later copy back."""
        copy = self._copies.pop(name, None)
        took = copy_s if copy_s > 0 else (now - copy.start if copy is not None else 0.0)
        if copy is not None and copy_s > 0:
            self._note_pace(name, copy.nbytes / copy_s >= PACE_KEPT * self.bytes_per_s)
        if copy is not None and took > 0:
            self.bytes_per_s += SMOOTHING * (copy.nbytes / took - self.bytes_per_s)
        self.stream_free_at = min(self.stream_free_at, now)
        for queued in self._copies.values():
            queued.start = max(queued.issued, self.stream_free_at)
            queued.end = self.stream_free_at = queued.start + queued.nbytes / self.bytes_per_s

    def progress(self, name: str, landed: float, now: float) -> None:
        """A report of a copy still running: `landed`, the share of its layers on the GPU."""
        copy = self._copies.get(name)
        if copy is not None:
            copy.seen_at, copy.seen_landed = now, landed

    def forget(self, name: str) -> None:
        """A load that failed or will not be predicted (read from disk while copied)."""
        self._copies.pop(name, None)
        self._note_pace(name, False)

    def predicted(self, name: str) -> PlannedCopy | None:
        return self._copies.get(name)

    def landing(self, name: str, forward_start: float) -> tuple[float, float] | None:
        """When the adapter's copy will have landed and how long it runs, as far as the scheduler
        may trust them: at the pace a report since its start showed; before such a report, for an
        adapter whose last timed copy kept the learned pace, at the learned bandwidth from the
        later of its planned start and `forward_start` (a copy into a slot that forwards in flight
        still read waits for them); None otherwise, or for a copy not predicted."""
        copy = self._copies.get(name)
        if copy is None:
            return None
        projected = copy.projected_end()
        if projected is not None:
            return projected, projected - copy.start
        if not copy.kept_pace_before:
            return None
        seconds = copy.nbytes / self.bytes_per_s
        return max(copy.start, forward_start) + seconds, seconds

    def _note_pace(self, name: str, kept: bool) -> None:
        if kept:
            self._kept_pace.add(name)
        else:
            self._kept_pace.discard(name)


@dataclass
class WeightedLine:
    """y = intercept + slope * x by least squares, each new point weighing the older ones down
    by 1 - LINE_SMOOTHING."""

    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - LINE_SMOOTHING
        self.n, self.sx, self.sy = keep * self.n + 1.0, keep * self.sx + x, keep * self.sy + y
        self.sxx, self.sxy = keep * self.sxx + x * x, keep * self.sxy + x * y

    def at(self, x: float) -> float | None:
        """None before any point; through the points' mean while their x are all alike."""
        if self.n == 0.0:
            return None
        spread = self.n * self.sxx - self.sx * self.sx
        if spread <= 1e-9 * self.n * self.sxx:
            return self.sy / self.n
        slope = (self.n * self.sxy - self.sx * self.sy) / spread
        return (self.sy - slope * self.sx) / self.n + slope * x


@dataclass
class StepClock:
    """When the forward sent next will start on the worker, and how long a forward lasts: a step
    of one token a sequence, and a forward carrying prompt tokens by a line over how many (it
    costs a fixed part more than a step besides its tokens), both learned from the spacing of
    results while the worker was busy."""

    step_s: float | None = None  # a forward of one token a sequence
    prompt_forwards: WeightedLine = field(default_factory=WeightedLine)  # seconds by tokens beyond one a sequence
    last_result_at: float | None = None
    _busy: bool = False  # a forward was still in flight at the last result

    def result(self, now: float, still_in_flight: int, extra_tokens: int) -> None:
        """A forward carrying `extra_tokens` beyond one a sequence ended, `still_in_flight` behind it."""
        if self._busy and self.last_result_at is not None:
            self._learn(now - self.last_result_at, extra_tokens)
        self._busy = still_in_flight > 0
        self.last_result_at = now

    def _learn(self, duration: float, extra_tokens: int) -> None:
        if extra_tokens > 0:
            self.prompt_forwards.add(extra_tokens, duration)
        elif self.step_s is None:
            self.step_s = duration
        else:
            self.step_s += SMOOTHING * (duration - self.step_s)

    def duration(self, extra_tokens: int) -> float:
        step = self.step_s or 0.0
        if extra_tokens == 0:
            return step
        return max(step, self.prompt_forwards.at(extra_tokens) or step)

    def lands_in_time(self, copy_end: float, copy_s: float, now: float, in_flight: Sequence[int],
                      extra_tokens: int) -> bool:
        """Whether a forward sent now behind forwards carrying `in_flight` extra tokens, itself
        carrying `extra_tokens` or more, would meet a copy of `copy_s` ending at `copy_end` without
        waiting for it (until a step has been timed, only a copy already done)."""
        if self.step_s is None:
            return copy_end <= now
        margin = max(LANDING_OVERLAP * min(self.duration(extra_tokens), copy_s), LANDING_STALL * self.step_s)
        return copy_end <= self.next_start(now, in_flight) + margin

    def next_start(self, now: float, in_flight: Sequence[int]) -> float:
        """The predicted start of a forward sent now behind forwards carrying `in_flight` extra tokens."""
        if not in_flight or self.step_s is None or self.last_result_at is None:
            return now
        return max(now, self.last_result_at + sum(self.duration(tokens) for tokens in in_flight))
