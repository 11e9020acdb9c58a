"""The replica routing policy (frontend/routing.py) on hand-made replica views."""

from __future__ import annotations

from collections import Counter

import pytest

from frontend.routing import BASE_MODEL, NoReplica, ReplicaView, Router, RoutingConfig, hash_order

REPLICAS = [f"r{i}" for i in range(4)]


def router_of(*views: ReplicaView, config: RoutingConfig = RoutingConfig()) -> Router:
    router = Router(config)
    for view in views:
        router.update(view)
    return router


def idle(*names: str) -> list[ReplicaView]:
    return [ReplicaView(name) for name in names]


def test_hash_order_is_stable_and_losing_a_replica_moves_only_its_adapters():
    adapters = [f"a{i}" for i in range(500)]
    homes = {a: hash_order(a, REPLICAS)[0] for a in adapters}
    assert homes == {a: hash_order(a, list(reversed(REPLICAS)))[0] for a in adapters}
    after = {a: hash_order(a, REPLICAS[:3])[0] for a in adapters}
    moved = [a for a in adapters if after[a] != homes[a]]
    assert moved and all(homes[a] == "r3" for a in moved)


def test_first_loads_spread_evenly_over_homes():
    router = router_of(*idle(*[f"r{i}" for i in range(8)]))
    counts = Counter()
    for i in range(800):
        decision = router.choose(f"a{i}", now=0.0)
        router.update(ReplicaView(decision.replica))  # the replica finished it: loads stay equal
        counts[decision.replica] += 1
    assert len(counts) == 8 and max(counts.values()) < 1.4 * 100 and min(counts.values()) > 0.6 * 100


def test_a_resident_adapter_goes_where_it_is_even_when_that_is_not_its_home():
    away = [name for name in REPLICAS if name != hash_order("x", REPLICAS)[0]][0]
    views = [ReplicaView(name, gpu_adapters=frozenset({"x"}) if name == away else frozenset()) for name in REPLICAS]
    decision = router_of(*views).choose("x", now=0.0)
    assert decision.replica == away and decision.reason == "resident"


def test_an_overloaded_holder_spills_to_the_host_cached_replica_before_the_home():
    home, cached, holder, _ = hash_order("x", REPLICAS)
    views = [ReplicaView(holder, gpu_adapters=frozenset({"x"}), requests=RoutingConfig().min_bound),
             ReplicaView(cached, host_adapters=frozenset({"x"})),
             *idle(*(name for name in REPLICAS if name not in (holder, cached)))]
    decision = router_of(*views).choose("x", now=0.0)
    assert (decision.replica, decision.reason) == (cached, "host-cached")
    views[1] = ReplicaView(cached)
    assert router_of(*views).choose("x", now=0.0) == type(decision)(home, "home")


def test_a_burst_before_the_next_view_stays_on_one_replica_within_the_load_bound():
    router = router_of(*idle(*REPLICAS))
    chosen = Counter(router.choose("new", now=0.0).replica for _ in range(4))
    assert len(chosen) == 1, "the first request's replica is taken to hold the adapter"
    more = Counter(router.choose("new", now=0.0).replica for _ in range(36))
    total = chosen + more
    assert max(total.values()) == RoutingConfig().min_bound, "the bound caps one replica's share"
    assert sum(total.values()) == 40


def test_a_hot_adapter_spreads_one_replica_per_interval():
    config = RoutingConfig(requests_per_replica=2, spread_interval_s=1.0, load_bound=100.0)
    holder = hash_order("hot", REPLICAS)[0]
    router = router_of(*[ReplicaView(n, gpu_adapters=frozenset({"hot"}) if n == holder else frozenset())
                         for n in REPLICAS], config=config)
    first = [router.choose("hot", now=0.0) for _ in range(2)]
    assert {d.replica for d in first} == {holder}
    spread = router.choose("hot", now=0.0)
    assert spread.reason == "spread" and spread.replica != holder
    again = router.choose("hot", now=0.5)
    assert again.reason == "resident", "no second spread within the interval"
    for _ in range(4):
        router.finished("hot")
    assert router.choose("hot", now=5.0).reason == "resident", "demand fell: no spread"


def test_base_model_requests_go_to_the_least_loaded_replica():
    views = [ReplicaView(name, requests=10 - i) for i, name in enumerate(REPLICAS)]
    assert router_of(*views).choose(BASE_MODEL, now=0.0).replica == REPLICAS[-1]


def test_replicas_not_serving_get_nothing_and_none_serving_is_an_error():
    views = [ReplicaView(name, serving=name == "r2") for name in REPLICAS]
    router = router_of(*views)
    assert {router.choose(f"a{i}", now=0.0).replica for i in range(20)} == {"r2"}
    router.update(ReplicaView("r2", serving=False))
    with pytest.raises(NoReplica):
        router.choose("a", now=0.0)
    router.remove("r2")
    assert "r2" not in router.replicas


def test_round_robin_baseline_takes_live_replicas_in_turn_blind_to_residency():
    views = [ReplicaView("r0", gpu_adapters=frozenset({"x"})), ReplicaView("r1"), ReplicaView("r2", serving=False),
             ReplicaView("r3")]
    router = router_of(*views, config=RoutingConfig(policy="round-robin"))
    decisions = [router.choose("x", now=0.0) for _ in range(6)]
    assert [d.replica for d in decisions] == ["r0", "r1", "r3", "r0", "r1", "r3"]
    assert {d.reason for d in decisions} == {"round-robin"}


def test_least_loaded_baseline_ignores_where_the_adapter_is():
    views = [ReplicaView("r0", gpu_adapters=frozenset({"x"}), requests=5), ReplicaView("r1", requests=2)]
    router = router_of(*views, config=RoutingConfig(policy="least-loaded"))
    assert [router.choose("x", now=0.0).replica for _ in range(4)] == ["r1", "r1", "r1", "r0"]


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="'random'"):
        RoutingConfig(policy="random")
