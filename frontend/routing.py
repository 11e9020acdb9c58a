"""Which replica serves a request: where its adapter already is, else its home by a bounded-load hash.

Each replica's scheduler publishes a `ReplicaView`: the adapters in its GPU slots (or being
copied there), those in its pinned host cache, and its requests. `Router.choose` takes, in
order:

1. `resident`: a replica with the adapter on its GPU that is not overloaded (the least loaded
   of them). No copy at all.
2. `host-cached`: a replica with the adapter in pinned memory, not overloaded: a copy of tens
   of milliseconds, no disk read. The first in the adapter's hash order.
3. `home`: the first replica in the adapter's hash order that is not overloaded. Rendezvous
   hashing gives every adapter its own order of replicas, so first loads spread evenly and
   each adapter has a home that the next request finds it on, instead of every replica
   loading every adapter.
4. `all-overloaded`: the least loaded replica.

Overloaded is the bounded-load rule of consistent hashing with bounded loads (Mirrokni,
Thorup, Zadimoghaddam 2018): a replica may hold at most ceil(c * m / n) of the m requests in
flight over n replicas (counting this one), with c = `RoutingConfig.load_bound`, and never
fewer than `RoutingConfig.min_bound`: a replica decodes a batch of that many requests about
as fast as one, so a light load is no reason to copy an adapter to a second GPU. It bounds
how far a popular adapter can pile onto its replicas before others take a share.

Hot adapters: an adapter with more requests in flight than `requests_per_replica` times the
replicas holding it is spread to one more replica (the next in its hash order without it),
at most once per `spread_interval_s` per adapter, so that demand, not luck, decides how many
replicas hold it, and a burst does not make every replica load it at once.

Between two views of a replica, the router counts what it sent there itself (requests and
adapters it will load), so a burst routed before the next view does not all land on the
replica that looked idle. Base-model requests (no adapter) go to the least loaded replica.

The baselines a measurement compares against (`RoutingConfig.policy`): `round-robin` (each
live replica in turn) and `least-loaded`, both blind to where adapters are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from settings.config import ROUTING_POLICIES

BASE_MODEL = ""


@dataclass(frozen=True)
class RoutingConfig:
    load_bound: float = 1.25  # c of bounded-load hashing: a replica holds at most ceil(c * m / n) requests
    min_bound: int = 16  # ... and never fewer than this many
    requests_per_replica: int = 8  # in-flight requests of one adapter per replica holding it before it spreads
    spread_interval_s: float = 1.0  # at most one new replica per adapter this often
    policy: str = "residency"  # one of ROUTING_POLICIES

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy {self.policy!r} is not one of {', '.join(ROUTING_POLICIES)}")


@dataclass(frozen=True)
class ReplicaView:
    """What a replica's scheduler published about itself."""

    name: str
    gpu_adapters: frozenset[str] = frozenset()  # in a GPU slot or being copied into one
    host_adapters: frozenset[str] = frozenset()  # in pinned host memory (or being read into it)
    requests: int = 0  # waiting and running
    serving: bool = True


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # resident, host-cached, home, spread, all-overloaded, base-model; or the baseline policy's name


class NoReplica(Exception):
    """No replica is serving."""


def hash_order(adapter: str, replicas: Iterable[str]) -> list[str]:
    """Rendezvous (highest random weight) order: stable per adapter, and removing a replica moves
    only the adapters whose home it was."""
    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


@dataclass
class _Pending:
    """What this router sent to a replica since its last view."""

    requests: int = 0
    adapters: set[str] = field(default_factory=set)


class Router:
    """The routing state of one frontend: the replicas' latest views and its own recent decisions."""

    def __init__(self, config: RoutingConfig = RoutingConfig()) -> None:
        self.config = config
        self._views: dict[str, ReplicaView] = {}
        self._pending: dict[str, _Pending] = {}
        self._in_flight: dict[str, int] = {}  # by adapter, this router's requests not finished yet
        self._last_spread: dict[str, float] = {}
        self._turns = 0  # round-robin's count of requests routed

    # The replicas' state -----------------------------------------------------------------

    def update(self, view: ReplicaView) -> None:
        """A replica's new view replaces what the router assumed about it."""
        self._views[view.name] = view
        self._pending[view.name] = _Pending()

    def remove(self, name: str) -> None:
        self._views.pop(name, None)
        self._pending.pop(name, None)

    @property
    def replicas(self) -> list[str]:
        return sorted(self._views)

    # Decisions ---------------------------------------------------------------------------

    def choose(self, adapter: str, now: float) -> Decision:
        """The replica for a request of `adapter` (BASE_MODEL for none); counts it as sent there."""
        live = [view for view in self._views.values() if view.serving]
        if not live:
            raise NoReplica("no replica is serving")
        decision = self._decide(adapter, live, now)
        pending = self._pending[decision.replica]
        pending.requests += 1
        if adapter != BASE_MODEL:
            pending.adapters.add(adapter)
            self._in_flight[adapter] = self._in_flight.get(adapter, 0) + 1
        return decision

    def finished(self, adapter: str) -> None:
        """A request chosen for `adapter` has ended (its count drives the spreading of hot adapters)."""
        left = self._in_flight.get(adapter, 0) - 1
        if left > 0:
            self._in_flight[adapter] = left
        else:
            self._in_flight.pop(adapter, None)

    def _decide(self, adapter: str, live: Sequence[ReplicaView], now: float) -> Decision:
        if self.config.policy == "round-robin":
            self._turns += 1
            return Decision(sorted(view.name for view in live)[(self._turns - 1) % len(live)], "round-robin")
        if self.config.policy == "least-loaded":
            return Decision(self._least_loaded(live).name, "least-loaded")
        if adapter == BASE_MODEL:
            return Decision(self._least_loaded(live).name, "base-model")
        bound = self._load_bound(live)
        fits = [view for view in live if self._load(view) + 1 <= bound]
        holders = [view for view in live if self._on_gpu(view, adapter)]
        holders_that_fit = [view for view in holders if view in fits]
        if holders_that_fit and not self._should_spread(adapter, len(holders), len(live), now):
            return Decision(self._least_loaded(holders_that_fit).name, "resident")
        order = hash_order(adapter, (view.name for view in fits if view not in holders))
        spreading = bool(holders_that_fit)
        if order:
            by_name = {view.name: view for view in live}
            cached = [name for name in order if adapter in by_name[name].host_adapters]
            if spreading:
                self._last_spread[adapter] = now
            reason = "spread" if spreading else "host-cached" if cached else "home"
            return Decision((cached or order)[0], reason)
        if holders_that_fit:
            return Decision(self._least_loaded(holders_that_fit).name, "resident")
        return Decision(self._least_loaded(live).name, "all-overloaded")

    def _should_spread(self, adapter: str, holders: int, replicas: int, now: float) -> bool:
        """More of the adapter's requests in flight than its holders should take, and not spread lately."""
        if holders >= replicas or self._in_flight.get(adapter, 0) < self.config.requests_per_replica * holders:
            return False
        return now - self._last_spread.get(adapter, -math.inf) >= self.config.spread_interval_s

    def _load_bound(self, live: Sequence[ReplicaView]) -> int:
        total = sum(self._load(view) for view in live) + 1
        return max(self.config.min_bound, math.ceil(self.config.load_bound * total / len(live)))

    def _load(self, view: ReplicaView) -> int:
        return view.requests + self._pending[view.name].requests

    def _on_gpu(self, view: ReplicaView, adapter: str) -> bool:
        return adapter in view.gpu_adapters or adapter in self._pending[view.name].adapters

    def _least_loaded(self, views: Sequence[ReplicaView]) -> ReplicaView:
        return min(views, key=lambda view: (self._load(view), view.name))
