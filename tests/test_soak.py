"""The soak of tests/soak.py for 40 seconds (`make soak` runs it for ten minutes): mixed adapters through three
slots, seeded and greedy repeats, cancels, deadlines, bad requests, unloads and new versions of an adapter
(some half-written), merges and unmerges of that adapter while traffic flows. Oracles: the statuses a call may earn, the request's own earlier
answer, and the server's Prometheus counters against what the clients counted."""

from soak import soak


def test_a_short_soak_finds_no_problem():
    report = soak(seconds=40, clients=8, seed=1)
    assert report["problems"] == []
    calls = report["calls"]
    for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "NOT_FOUND"):
        assert calls.get(code, 0) > 0, f"the soak made no call ending {code}: {calls}"
    assert report["repeated_requests"] < calls["OK"]     # some answers were compared with an earlier one
    assert report["merges_and_unmerges"] > 0 and report["merged_steps"] > 0, report
    assert not {"INTERNAL", "UNKNOWN", "UNAVAILABLE"} & set(calls)
