"""The worker's timeline: forwards and loads as Chrome-trace spans that show the overlap."""

from __future__ import annotations

import time

from tests.driver import Driver, Request, make_engine
from worker.timeline import COMPUTE_LANE, COPY_LANE


def test_slow_load_overlaps_forwards_of_other_requests(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"])
    engine.copier.hook = lambda name, slot, layer: time.sleep(0.15)
    engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    engine.stage_adapter("a1")
    engine.wait_staged("a1")
    engine.load_adapter("a1", 0)
    base = Request("base", list(range(5, 25)), max_new_tokens=30)
    driver = Driver(engine, chunk=4)
    while engine.pending:
        driver.step([base])
        engine.poll()
    trace = engine.timeline.chrome_trace()
    loads = [e for e in trace if e["tid"] == COPY_LANE]
    forwards = [e for e in trace if e["tid"] == COMPUTE_LANE]
    assert [(e["name"], e["args"]["slot"]) for e in loads] == [("a1", 0)]
    load = loads[0]
    assert load["dur"] >= 0.25e6  # two layers, 0.15 s each
    overlapping = [f for f in forwards if f["ts"] < load["ts"] + load["dur"] and load["ts"] < f["ts"] + f["dur"]]
    assert len(overlapping) >= 2
    assert all(e["ph"] == "X" and e["args"]["tokens"] >= 1 for e in forwards)
    engine.close()
