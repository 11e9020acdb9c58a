"""The worker's timeline: forwards and loads as Chrome-trace spans that show the overlap."""

from __future__ import annotations

import time

from tests.driver import Driver, Request, make_engine
from worker.timeline import COMPUTE_LANE, COPY_LANE


def test_slow_load_overlaps_forwards_of_other_requests(model_dirs, mixed_adapter_dirs):
    """Each layer's copy is held until one more forward of another request has run (not a
    fixed sleep: a forward's time varies on a loaded machine); the load's span then covers
    them. If the copier blocked the compute path, no forward would run while it waits."""
    engine = make_engine(model_dirs["llama"])
    steps_run = []

    def hold_until_another_forward_ran(name: str, slot: int, layer: int) -> None:
        deadline = time.monotonic() + 10
        while len(steps_run) <= layer and time.monotonic() < deadline:
            time.sleep(0.01)

    engine.copier.hook = hold_until_another_forward_ran
    engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    engine.stage_adapter("a1")
    engine.wait_staged("a1")
    engine.load_adapter("a1", 0)
    base = Request("base", list(range(5, 25)), max_new_tokens=30)
    driver = Driver(engine, chunk=4)
    while engine.pending:
        driver.step([base])
        steps_run.append(True)
        engine.poll()
    trace = engine.timeline.chrome_trace()
    loads = [e for e in trace if e["tid"] == COPY_LANE]
    forwards = [e for e in trace if e["tid"] == COMPUTE_LANE]
    assert [(e["name"], e["args"]["slot"]) for e in loads] == [("a1", 0)]
    load = loads[0]
    overlapping = [f for f in forwards if f["ts"] < load["ts"] + load["dur"] and load["ts"] < f["ts"] + f["dur"]]
    assert len(overlapping) >= 2
    assert all(e["ph"] == "X" and e["args"]["tokens"] >= 1 for e in forwards)
    engine.close()
