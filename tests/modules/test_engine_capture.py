"""The engine's capture machinery on its own: a captured step's warm-up, capture, replay and re-capture, and the
autocast it captures under (the engine's use of it is in test_engine.py)."""

from __future__ import annotations

import torch
from standin_graphs import StandInGraphs

from modules.engine_capture import CapturedStep, _uncached_autocast, first_line


def counting_step():
    """``(captured step over a stand-in graph backend, its backend, its state, the calls of the step)``."""
    calls = []

    def step(state: dict) -> None:
        calls.append(state["hidden"].data_ptr())
        state["hidden"].add_(1)

    graphs = StandInGraphs()
    return CapturedStep(step, graphs), graphs, {"hidden": torch.zeros(2)}, calls


def test_a_captured_step_warms_up_then_captures_then_only_replays():
    captured, graphs, state, calls = counting_step()
    addresses = (state["hidden"].data_ptr(),)
    ran = []
    for _ in range(4):
        ready = captured.ready(addresses)
        ran.append((ready, captured(state, addresses, ready)))
    # 1st call: the warm-up (the step runs); 2nd: capture + one replay; then replays only
    assert ran == [(False, 0), (False, 1), (True, 0), (True, 0)]
    assert graphs.warmups == 1 and graphs.captures == 1
    assert len(calls) == 4 and torch.equal(state["hidden"], torch.full((2,), 4.0))  # each call ran the step once


def test_a_captured_step_captures_again_at_other_addresses_and_after_drop_without_a_second_warm_up():
    captured, graphs, state, _ = counting_step()
    first = (state["hidden"].data_ptr(),)
    for _ in range(2):
        captured(state, first, captured.ready(first))
    assert captured.ready(first) and captured.ready((first[0],))  # an equal tuple: no re-capture
    state["hidden"] = torch.zeros(3)  # a buffer re-made elsewhere (a release, an FSDP2 re-gather)
    moved = (state["hidden"].data_ptr(),)
    assert not captured.ready(moved)
    assert captured(state, moved, False) == 1 and graphs.captures == 2
    captured.drop()
    assert not captured.ready(moved)
    assert captured(state, moved, False) == 1 and graphs.captures == 3 and graphs.warmups == 1


def test_capture_autocast_keeps_the_dtype_and_drops_the_cast_cache():
    cpu = torch.device("cpu")
    with _uncached_autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")  # no autocast outside: none inside
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        with _uncached_autocast(cpu):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not torch.is_autocast_cache_enabled()
        assert torch.is_autocast_cache_enabled()


def test_first_line_names_the_error_type_and_its_first_line():
    assert first_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert first_line(RuntimeError()) == "RuntimeError"
