"""The --auto-merge rule (server/engine/auto_merge.py): exact decisions over queue compositions, and a
simulated trace (one adapter dominant, then an even mix, then dominant again)."""

import dataclasses

import pytest

from loraplex.server.engine.auto_merge import AutoMergeSettings, Decision, QueueView, decide

# cooldown: 10 x 0.1 s = 1 s after the last switch
S = AutoMergeSettings(enter_share=0.8, exit_share=0.5, min_requests=4, max_wait_s=0.5,
                      switch_cost_s=0.1, cooldown_factor=10.0)


def v(counts, merged=None, **kw):
    return QueueView(counts=counts, merged=merged, now_s=100.0, **kw)


KEEP_BASE, KEEP_MERGED, UNMERGE = ("keep", "base", None), ("keep", "merged", None), ("unmerge", "base", None)
MERGE_A = ("merge", "base", "a")

CASES = [
    # empty queue: nothing to run, state kept
    ("empty", v({}), S, ("keep", None, None)),
    ("empty merged", v({}, "a"), S, ("keep", None, None)),
    ("zero counts", v({"a": 0, "": 0}), S, ("keep", None, None)),
    # one adapter dominant
    ("90% merges", v({"a": 9, "b": 1}), S, MERGE_A),
    ("exactly enter_share merges", v({"a": 8, "b": 1, "c": 1}), S, MERGE_A),
    ("just below enter_share", v({"a": 7, "b": 2, "c": 1}), S, KEEP_BASE),
    ("90% merged: merged step", v({"a": 9, "b": 1}, "a"), S, KEEP_MERGED),
    # even mix
    ("even mix: no merge", v({"a": 4, "b": 3, "c": 3}), S, KEEP_BASE),
    ("even mix: unmerges", v({"a": 4, "b": 3, "c": 3}, "a"), S, UNMERGE),
    ("another adapter dominant: unmerge first", v({"a": 1, "b": 9}, "a"), S, UNMERGE),
    ("merged adapter gone: unmerge", v({"b": 2}, "a"), S, UNMERGE),
    # hysteresis: between exit_share and enter_share the state stays
    ("60% unmerged stays unmerged", v({"a": 6, "b": 4}), S, KEEP_BASE),
    ("60% merged stays merged", v({"a": 6, "b": 4}, "a"), S, KEEP_MERGED),
    ("exactly exit_share stays merged", v({"a": 5, "b": 5}, "a"), S, KEEP_MERGED),
    ("just below exit_share unmerges", v({"a": 4, "b": 5}, "a"), S, UNMERGE),
    # the wait bound forces a base step
    ("others waited max_wait_s", v({"a": 9, "b": 1}, "a", other_wait_s=0.5), S, KEEP_BASE),
    ("wait + next step reaches the bound", v({"a": 9, "b": 1}, "a", other_wait_s=0.45, step_s=0.05), S, KEEP_BASE),
    ("wait + next step within the bound", v({"a": 9, "b": 1}, "a", other_wait_s=0.4, step_s=0.05), S, KEEP_MERGED),
    ("no others: the wait is moot", v({"a": 5}, "a", other_wait_s=9.0), S, KEEP_MERGED),
    # too few requests
    ("3 requests: no merge", v({"a": 3}), S, KEEP_BASE),
    ("min_requests: merge", v({"a": 4}), S, MERGE_A),
    ("few requests keep a merge", v({"a": 1}, "a"), S, KEEP_MERGED),
    # switch cost: no merge within cooldown_factor x switch_cost_s of the last switch
    ("cooldown blocks a merge", v({"a": 9, "b": 1}, last_switch_s=99.5), S, KEEP_BASE),
    ("just after an unmerge", v({"a": 9, "b": 1}, last_switch_s=100.0), S, KEEP_BASE),
    ("cooldown over", v({"a": 9, "b": 1}, last_switch_s=99.0), S, MERGE_A),
    ("free switch: no cooldown", v({"a": 9, "b": 1}, last_switch_s=100.0),
     dataclasses.replace(S, switch_cost_s=0.0), MERGE_A),
    ("larger measured cost, longer cooldown", v({"a": 9, "b": 1}, last_switch_s=99.0),
     dataclasses.replace(S, switch_cost_s=0.2), KEEP_BASE),
    # a merge that did not pay: unmerged, and no merge while the hold is on
    ("merged steps slower: unmerge", v({"a": 9, "b": 1}, "a", merged_slower=True), S, UNMERGE),
    ("merged steps slower, even alone: unmerge", v({"a": 9}, "a", merged_slower=True), S, UNMERGE),
    ("hold blocks a merge", v({"a": 9, "b": 1}, hold_until_s=100.5), S, KEEP_BASE),
    ("hold over", v({"a": 9, "b": 1}, hold_until_s=100.0), S, MERGE_A),
    ("a hold does not block an unmerge", v({"a": 4, "b": 3, "c": 3}, "a", hold_until_s=200.0), S, UNMERGE),
    ("cooldown does not hold a merge", v({"a": 4, "b": 3, "c": 3}, "a", last_switch_s=100.0), S, UNMERGE),
    # a merge being built: keep, base steps, no second merge, no unmerge
    ("building, dominant", v({"a": 9, "b": 1}, "a", building=True), S, KEEP_BASE),
    ("building, even mix", v({"a": 3, "b": 3, "c": 4}, "a", building=True), S, KEEP_BASE),
    ("building, another dominant", v({"b": 9}, "a", building=True), S, KEEP_BASE),
    ("building, merged only", v({"a": 9}, "a", building=True), S, KEEP_BASE),
    # base-model requests: never merged, counted in the share
    ("base only", v({"": 10}), S, KEEP_BASE),
    ("base dominant", v({"": 9, "a": 1}), S, KEEP_BASE),
    ("base counts in the share", v({"": 3, "a": 7}), S, KEEP_BASE),
    ("adapter dominant beside base", v({"": 1, "a": 9}), S, MERGE_A),
    ("base overtakes: unmerge", v({"": 6, "a": 4}, "a"), S, UNMERGE),
    ("base is not a tie rival", v({"": 5, "a": 5}), dataclasses.replace(S, enter_share=0.5), MERGE_A),
    # ties between adapters merge nobody; a merged adapter in a tie stays while above exit_share
    ("tie: no merge", v({"a": 5, "b": 5}), dataclasses.replace(S, enter_share=0.5), KEEP_BASE),
    ("tie below top: merge", v({"a": 8, "b": 1, "c": 1}), S, MERGE_A),
    ("tie, merged stays", v({"a": 5, "b": 5}, "b"), S, KEEP_MERGED),
]


@pytest.mark.parametrize("view,settings,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(view, settings, expected):
    d = decide(view, settings)
    assert isinstance(d, Decision)
    assert (d.action, d.step, d.adapter_id) == expected, d.reason


@pytest.mark.parametrize("kw", [dict(enter_share=0.4, exit_share=0.5), dict(exit_share=0.0), dict(enter_share=1.1),
                                dict(min_requests=0), dict(max_wait_s=0.0), dict(switch_cost_s=-1.0),
                                dict(cooldown_factor=-1.0)])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        AutoMergeSettings(**kw)


def test_trace_merges_unmerges_and_merges_again():
    """Simulated steps: 90% on "a" for 5 s, an even mix for 1 s, 90% on "a" again until 12 s. A merge's copy
    is ready switch_cost_s after it starts; a merged step takes 30 ms, a base step 50 ms."""
    s = dataclasses.replace(S, switch_cost_s=0.2)               # cooldown 2 s: the second merge waits for it
    merged_dt, base_dt = 0.03, 0.05
    phases = [(5.0, {"a": 9, "b": 1}), (6.0, {"a": 3, "b": 3, "c": 3, "": 1}), (12.0, {"a": 8, "": 1, "c": 1})]

    now, merged, building, ready_at, last_switch = 0.0, None, False, 0.0, float("-inf")
    others_last_end = 0.0                # when requests the merged set cannot run last finished a step
    events, waits, steps = [], [], {"merged": 0, "base": 0}
    while now < phases[-1][0]:
        counts = next(c for end, c in phases if now < end)
        if building and now >= ready_at:
            building, last_switch = False, ready_at
        others = merged is not None and any(n for a, n in counts.items() if a != merged)
        view = QueueView(counts=counts, merged=merged, building=building,
                         other_wait_s=now - others_last_end if others else 0.0, step_s=merged_dt,
                         now_s=now, last_switch_s=last_switch)
        d = decide(view, s)
        if d.action == "merge":
            merged, building, ready_at = d.adapter_id, True, now + s.switch_cost_s
            events.append(("merge", d.adapter_id, now))
        elif d.action == "unmerge":
            merged, last_switch = None, now
            events.append(("unmerge", None, now))
        steps[d.step] += 1
        if d.step == "base":
            waits.append(now - others_last_end)
            now += base_dt
            others_last_end = now
        else:
            assert merged is not None and not building
            now += merged_dt

    assert [e[:2] for e in events] == [("merge", "a"), ("unmerge", None), ("merge", "a")]
    (_, _, t_merge), (_, _, t_unmerge), (_, _, t_again) = events
    assert t_merge == 0.0
    assert 5.0 <= t_unmerge < 5.0 + base_dt                     # at the first step of the even mix
    cooldown = s.cooldown_factor * s.switch_cost_s
    assert t_unmerge + cooldown <= t_again < t_unmerge + cooldown + base_dt   # after the cooldown, at once
    assert max(waits) <= s.max_wait_s + 1e-9                    # nobody waited past the bound
    assert steps["merged"] > 3 * steps["base"]                  # yet most steps ran on the merged copy


def test_a_merge_is_judged_by_its_decode_steps_against_the_bases_of_the_same_size():
    from loraplex.server.engine.auto_planner import JUDGE_STEPS, StepTimes

    times, copy = StepTimes(), ("a", 1, "dense")
    for _ in range(3):
        times.took(None, 16, 0.30)         # while the copy was being built: the CPU was shared
    times.took(copy, 16, 0.15)             # not compared with those: a base step of its size asked for
    assert times.take_probe() and not times.take_probe()
    times.took(None, 16, 0.10)
    times.took(None, 8, 0.05)
    for _ in range(JUDGE_STEPS - 1):
        times.took(copy, 16, 0.15)
    assert not times.take_probe()
    times.took(copy, 3, 0.01)              # a size the base has not run: not compared, a base step asked for
    assert times.take_probe() and not times.take_probe()
    assert not times.slower(copy)          # not judged before JUDGE_STEPS comparisons
    times.took(copy, 16, 0.15)
    assert times.slower(copy) and not times.slower(("b", 1, "dense"))
    faster = ("a", 2, "dense")             # a new copy starts a new judgement, on base steps run since
    times.took(faster, 8, 0.04)
    assert times.take_probe()
    times.took(None, 8, 0.05)
    for _ in range(JUDGE_STEPS):
        times.took(faster, 8, 0.04)
    assert not times.slower(faster) and not times.slower(copy)
