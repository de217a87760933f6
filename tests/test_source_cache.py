"""The run's cache of the reconstruction row's recordings (guidance.SourceCache): one
entry per stop layer within a step, older steps dropped, passes counted."""

from __future__ import annotations

from xmgie.mgie_core.guidance import SourceCache, SourceRecorder


def test_a_step_keeps_every_stop_layer_and_a_new_step_drops_the_old():
    cache = SourceCache()
    a, b, c = SourceRecorder(), SourceRecorder(), SourceRecorder()
    assert cache.get(0, "x") is None
    cache.put(0, "x", a)
    cache.put(0, None, b)              # another control stopping elsewhere, same step
    assert cache.get(0, "x") is a and cache.get(0, None) is b and len(cache) == 2
    assert cache.get(1, "x") is None   # another step never sees step 0's recording
    cache.put(1, "x", c)
    assert cache.get(0, "x") is None and cache.get(0, None) is None
    assert cache.get(1, "x") is c and len(cache) == 1 and cache.passes == 3
    cache.forget(1, "x")
    assert cache.get(1, "x") is None and cache.passes == 3
