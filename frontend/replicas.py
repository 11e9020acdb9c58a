"""The replicas one frontend serves: a `SchedulerLink` each, their readiness, their state, routing.

A replica is one scheduler with its worker. The frontend holds a link to each, named by its
position ("0", "1", ...) in the addresses it was given. A replica takes requests once it has
answered `server_info` and holds every adapter this frontend knows to be registered on the
fleet (a replica that joins or comes back is given them first); it stops taking them when
its link drops, and starts over when it answers again. The router (frontend/routing.py) sees
each ready replica's `ReplicaState`, asked for every `state_interval_s`.

Adapter operations span the fleet: LoadAdapter validates on one replica, then registers on
the others, and if any refuses, unloads it from those that took it (all or none);
UnloadAdapter unloads everywhere. The fleet registry is this frontend's: adapters registered
through another frontend join it when a replica that holds them becomes ready, and a
replica that was down during an UnloadAdapter unloads the adapter when it comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from frontend.errors import ServiceError, StatusCode
from frontend.routing import NoReplica, ReplicaView, Router, RoutingConfig
from frontend.scheduler_link import LivenessConfig, SchedulerFailure, SchedulerLink, SchedulerUnavailable
from protos.loraserve.v1 import internal_pb2, serving_pb2

log = logging.getLogger("loraserve.frontend.replicas")
T = TypeVar("T")
NO_REPLICA_READY = ("the scheduler is not ready (of no replica: starting, or reconnecting after it was lost); "
                    "retry shortly")
# The most advanced state wins when adapters' states on several replicas are shown as one.
STATE_ORDER = [serving_pb2.ADAPTER_STATE_UNSPECIFIED, serving_pb2.ADAPTER_STATE_ON_DISK,
               serving_pb2.ADAPTER_STATE_STAGING, serving_pb2.ADAPTER_STATE_HOST,
               serving_pb2.ADAPTER_STATE_LOADING, serving_pb2.ADAPTER_STATE_RESIDENT,
               serving_pb2.ADAPTER_STATE_UNLOADING]


@dataclass(frozen=True)
class ReplicaSettings:
    liveness: LivenessConfig
    routing: RoutingConfig
    state_interval_s: float  # how often each ready replica is asked for its state
    readiness_probe_timeout_s: float
    readiness_retry_s: float
    admin_timeout_s: float
    load_adapter_timeout_s: float


class Replica:
    def __init__(self, name: str, address: str, link: SchedulerLink) -> None:
        self.name = name
        self.address = address
        self.link = link
        self.info: serving_pb2.ServerInfo | None = None  # set while it takes requests
        self.readiness: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.info is not None

    async def admin(self, request: internal_pb2.AdminRequest, timeout_s: float | None) -> internal_pb2.AdminResponse:
        return await self.link.admin(request, timeout_s)


class ReplicaSet:
    def __init__(self, addresses: Sequence[str], settings: ReplicaSettings,
                 on_serving_changed: Callable[[bool], None] = lambda serving: None) -> None:
        if not addresses:
            raise ValueError("a frontend needs at least one scheduler address")
        self.settings = settings
        self.replicas = [self._replica(str(index), address) for index, address in enumerate(addresses)]
        self.router = Router(settings.routing)
        self._on_serving_changed = on_serving_changed
        self._registry: dict[str, str] = {}  # adapter name -> path, registered on the fleet
        self._unloaded: set[str] = set()  # unloaded through this frontend: a returning replica drops them too
        self._fleet_operation = asyncio.Lock()  # one LoadAdapter/UnloadAdapter/sync at a time
        self._state_poller: asyncio.Task[None] | None = None
        self._closing = False

    def _replica(self, name: str, address: str) -> Replica:
        replica: Replica

        def lost() -> None:
            self._on_lost(replica)

        replica = Replica(name, address, SchedulerLink(address, self.settings.liveness, on_disconnect=lost))
        return replica

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.link.start()
            self.router.update(ReplicaView(replica.name, serving=False))
            replica.readiness = asyncio.create_task(self._become_ready(replica))
        self._state_poller = asyncio.create_task(self._poll_states())

    async def close(self) -> None:
        self._closing = True
        tasks = [task for task in [self._state_poller, *(r.readiness for r in self.replicas)] if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in self.replicas:
            await replica.link.close()

    # Serving -----------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return any(replica.ready for replica in self.replicas)

    @property
    def server_info(self) -> serving_pb2.ServerInfo | None:
        """The first ready replica's answer, naming every replica; None while none is ready."""
        ready = self.ready_replicas()
        if not ready:
            return None
        info = serving_pb2.ServerInfo()
        info.CopyFrom(ready[0].info)
        info.replicas[:] = [replica.address for replica in self.replicas]
        return info

    def ready_replicas(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.ready]

    @property
    def in_flight(self) -> int:
        return sum(replica.link.in_flight for replica in self.replicas)

    def fail_all(self, reason: str) -> None:
        for replica in self.replicas:
            replica.link.fail_all(reason)

    def route(self, adapter: str) -> Replica:
        """The replica for a request of `adapter`; `finished(adapter)` once it has ended."""
        try:
            decision = self.router.choose(adapter, time.monotonic())
        except NoReplica:
            raise SchedulerUnavailable(NO_REPLICA_READY) from None
        log.debug("routed", extra={"adapter": adapter, "replica": decision.replica, "reason": decision.reason})
        return self.replicas[int(decision.replica)]

    def finished(self, adapter: str) -> None:
        self.router.finished(adapter)

    # Readiness ---------------------------------------------------------------------------

    async def _become_ready(self, replica: Replica) -> None:
        """Until the replica answers; then it gets the fleet's adapters and takes requests."""
        for attempt in itertools.count():
            try:
                info = await self._admin_result(replica, "server_info", serving_pb2.GetServerInfoRequest(),
                                                self.settings.readiness_probe_timeout_s)
                await self._sync_adapters(replica)
                state = await self._admin_result(replica, "replica_state", internal_pb2.ReplicaStateRequest(),
                                                 self.settings.admin_timeout_s)
            except (SchedulerUnavailable, SchedulerFailure) as error:
                log.log(logging.INFO if attempt == 0 else logging.DEBUG, "waiting for replica %s at %s: %s",
                        replica.name, replica.address, error)
                await asyncio.sleep(self.settings.readiness_retry_s)
                continue
            was_serving = self.serving
            replica.info = info
            self.router.update(view_of(replica.name, state))
            log.info("replica %s ready: %s (%s, %s, context %d)", replica.name, info.model, info.architecture,
                     info.device, info.max_context_length, extra={"replica": replica.name})
            if not was_serving:
                self._on_serving_changed(True)
            return

    def _on_lost(self, replica: Replica) -> None:
        """Its link dropped: a new scheduler may know other adapters, so it is synced again once it answers."""
        if not self._closing:
            self.take_out(replica, "its scheduler's connection dropped")

    def take_out(self, replica: Replica, reason: str) -> None:
        """Out of routing at once (its scheduler or worker is gone); back once it answers again."""
        if replica.readiness is not None and not replica.readiness.done():
            return  # already waiting for it
        log.warning("replica %s out of routing: %s", replica.name, reason, extra={"replica": replica.name})
        was_serving = self.serving
        replica.info = None
        self.router.update(ReplicaView(replica.name, serving=False))
        replica.readiness = asyncio.create_task(self._become_ready(replica))
        if was_serving and not self.serving:
            self._on_serving_changed(False)

    async def _sync_adapters(self, replica: Replica) -> None:
        """The replica's adapters join the registry; it gets those it lacks and drops those unloaded."""
        async with self._fleet_operation:
            listed = await self._admin_result(replica, "list_adapters", serving_pb2.ListAdaptersRequest(),
                                              self.settings.admin_timeout_s)
            held = {adapter.name: adapter.path for adapter in listed.adapters
                    if adapter.state != serving_pb2.ADAPTER_STATE_UNLOADING}
            for name in held.keys() & self._unloaded:
                await self._unload_on(replica, name)
            for name, path in held.items():
                if name not in self._unloaded:
                    self._registry.setdefault(name, path)
            for name in self._registry.keys() - held.keys():
                try:
                    await self._load_on(replica, serving_pb2.LoadAdapterRequest(name=name, path=self._registry[name]))
                except SchedulerFailure as error:
                    log.error("replica %s cannot load adapter %s that the others serve: %s", replica.name, name,
                              error, extra={"replica": replica.name, "adapter": name})

    # State -------------------------------------------------------------------------------

    async def _poll_states(self) -> None:
        while True:
            await asyncio.sleep(self.settings.state_interval_s)
            await asyncio.gather(*(self._refresh_state(replica) for replica in self.ready_replicas()))

    async def _refresh_state(self, replica: Replica) -> None:
        try:
            state = await self._admin_result(replica, "replica_state", internal_pb2.ReplicaStateRequest(),
                                             self.settings.admin_timeout_s)
        except SchedulerFailure as error:  # it answered, refusing: e.g. its worker is being restarted
            if error.code is StatusCode.UNAVAILABLE and replica.ready:
                self.take_out(replica, str(error))
            return
        except SchedulerUnavailable as error:  # no answer in time: the link's liveness check decides
            log.debug("no state from replica %s: %s", replica.name, error)
            return
        if replica.ready:
            self.router.update(view_of(replica.name, state))

    # Fleet operations --------------------------------------------------------------------

    async def load_adapter(self, request: serving_pb2.LoadAdapterRequest) -> serving_pb2.LoadAdapterResponse:
        """On every ready replica or none: the first validates, then the others; a refusal undoes the rest."""
        async with self._fleet_operation:
            first, *others = self._ready_or_unavailable()
            response = await self._load_on(first, request)
            results = await asyncio.gather(*(self._load_on(r, request) for r in others), return_exceptions=True)
            refusals = [(r, result) for r, result in zip(others, results) if isinstance(result, BaseException)]
            if refusals:
                took = [first, *(r for r, result in zip(others, results) if not isinstance(result, BaseException))]
                await asyncio.gather(*(self._unload_on(r, request.name) for r in took), return_exceptions=True)
                replica, error = refusals[0]
                raise _on_replica(error, replica)
            self._registry[request.name] = response.adapter.path
            self._unloaded.discard(request.name)
            return response

    async def unload_adapter(self, request: serving_pb2.UnloadAdapterRequest) -> serving_pb2.UnloadAdapterResponse:
        """From every ready replica, each once its requests for it have finished."""
        async with self._fleet_operation:
            ready = self._ready_or_unavailable()
            results = await asyncio.gather(*(self._unload_on(r, request.name) for r in ready), return_exceptions=True)
        failures = [(r, result) for r, result in zip(ready, results) if isinstance(result, BaseException)]
        not_found = [r for r, error in failures if isinstance(error, ServiceError) and error.code is StatusCode.NOT_FOUND]
        if len(not_found) < len(ready):
            self._registry.pop(request.name, None)
            self._unloaded.add(request.name)
        real = [(r, error) for r, error in failures if r not in not_found]
        if real or len(not_found) == len(ready):
            replica, error = (real or failures)[0]
            raise _on_replica(error, replica) if len(ready) > 1 else error
        return serving_pb2.UnloadAdapterResponse()

    async def list_adapters(self) -> serving_pb2.ListAdaptersResponse:
        """Each adapter once, with its state on every ready replica."""
        lists = await self._on_each_ready("list_adapters", serving_pb2.ListAdaptersRequest(),
                                          self.settings.admin_timeout_s)
        merged: dict[str, serving_pb2.AdapterInfo] = {}
        for replica, listed in lists:
            for adapter in listed.adapters:
                _merge_placement(merged, replica.name, adapter)
        return serving_pb2.ListAdaptersResponse(adapters=[merged[name] for name in sorted(merged)])

    async def stats(self, request: serving_pb2.GetStatsRequest) -> serving_pb2.ServerStats:
        """The sums over the ready replicas, and each one's figures."""
        total = serving_pb2.ServerStats()
        for replica, stats in await self._on_each_ready("stats", request, self.settings.admin_timeout_s):
            for field, value in stats.ListFields():
                setattr(total, field.name, getattr(total, field.name) + value)
            total.replicas.add(replica=replica.name, stats=stats)
        return total

    async def timeline(self, request: serving_pb2.GetTimelineRequest) -> serving_pb2.Timeline:
        """The first ready replica's (the timeline is one worker's)."""
        replica = self._ready_or_unavailable()[0]
        return await self._admin_result(replica, "timeline", request, self.settings.load_adapter_timeout_s)

    async def figures(self, timeout_s: float) -> dict[str, internal_pb2.MetricsSnapshot | None]:
        """Each replica's figures for a metrics scrape; None for one that does not answer."""
        async def one(replica: Replica) -> internal_pb2.MetricsSnapshot | None:
            try:
                return await self._admin_result(replica, "metrics", internal_pb2.MetricsRequest(), timeout_s)
            except (SchedulerUnavailable, SchedulerFailure) as error:
                log.debug("no figures from replica %s for this scrape: %s", replica.name, error)
                return None

        snapshots = await asyncio.gather(*(one(replica) for replica in self.replicas))
        return {replica.name: snapshot for replica, snapshot in zip(self.replicas, snapshots)}

    async def server_info_now(self, timeout_s: float) -> serving_pb2.ServerInfo:
        """Asks a ready replica again (GetServerInfo), naming every replica."""
        replica = self._ready_or_unavailable()[0]
        info = await self._admin_result(replica, "server_info", serving_pb2.GetServerInfoRequest(), timeout_s)
        info.replicas[:] = [r.address for r in self.replicas]
        return info

    # Internals ---------------------------------------------------------------------------

    def _ready_or_unavailable(self) -> list[Replica]:
        ready = self.ready_replicas()
        if not ready:
            raise SchedulerUnavailable(NO_REPLICA_READY)
        return ready

    async def _load_on(self, replica: Replica, request: serving_pb2.LoadAdapterRequest
                       ) -> serving_pb2.LoadAdapterResponse:
        return await self._admin_result(replica, "load_adapter", request, self.settings.load_adapter_timeout_s)

    async def _unload_on(self, replica: Replica, name: str) -> serving_pb2.UnloadAdapterResponse:
        # No fixed timeout: the scheduler answers once the adapter's requests have finished.
        return await self._admin_result(replica, "unload_adapter", serving_pb2.UnloadAdapterRequest(name=name), None)

    async def _on_each_ready(self, command: str, request, timeout_s: float) -> list[tuple[Replica, T]]:
        ready = self._ready_or_unavailable()
        results = await asyncio.gather(*(self._admin_result(r, command, request, timeout_s) for r in ready))
        return list(zip(ready, results))

    @staticmethod
    async def _admin_result(replica: Replica, command: str, request, timeout_s: float | None):
        response = await replica.admin(internal_pb2.AdminRequest(**{command: request}), timeout_s)
        return getattr(response, command)


def view_of(name: str, state: internal_pb2.ReplicaState) -> ReplicaView:
    """What the router sees of a replica that published `state`."""
    return ReplicaView(name, gpu_adapters=frozenset(state.gpu_adapters), host_adapters=frozenset(state.host_adapters),
                       requests=state.requests)


def _merge_placement(merged: dict[str, serving_pb2.AdapterInfo], replica: str,
                     adapter: serving_pb2.AdapterInfo) -> None:
    placement = serving_pb2.AdapterPlacement(replica=replica, state=adapter.state, slot=adapter.slot,
                                             active_requests=adapter.active_requests)
    known = merged.get(adapter.name)
    if known is None:
        known = merged[adapter.name] = serving_pb2.AdapterInfo()
        known.CopyFrom(adapter)
        known.active_requests = 0
    elif STATE_ORDER.index(adapter.state) > STATE_ORDER.index(known.state):
        known.state, known.slot = adapter.state, adapter.slot
    known.active_requests += adapter.active_requests
    known.replicas.append(placement)


def _on_replica(error: BaseException, replica: Replica) -> BaseException:
    """The error, its message naming the replica that gave it."""
    if isinstance(error, ServiceError):
        return ServiceError(f"replica {replica.name}: {error.message}", error.code)
    return error
