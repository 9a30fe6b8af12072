"""--auto-merge: each step, whether to merge, unmerge or keep, and which weight set the step runs on.

A pure function of what the scheduler sees (no threads, no torch): after dLoRA (OSDI '24), a per-step
choice between the merged copy and the base, with two thresholds for hysteresis, a charged switch cost
and a bound on waiting. Auto-merge uses the `dense` method, so the merged adapter's requests may run in
either set: on the merged copy, or on the base through the LoRA path.

The rule. `share` is the top adapter's count over all runnable (running and waiting) requests, base-model
requests ("") included; the base model is never merged.

1. Nothing runnable: keep, no step (idling is no evidence that the traffic changed).
2. A merge being built: keep (no second merge, no unmerge) and run a base step until the copy is ready.
3. Unmerged: merge the top adapter when all of these hold, else keep; the step is base either way
   (the copy is not ready yet):
   - it is the only top adapter (a tie merges nobody),
   - share >= enter_share and it has at least min_requests runnable requests,
   - the switch cost is paid for: at least cooldown_factor x switch_cost_s since the last switch
     (a merge ready or an unmerge). So two merges start at least that far apart and building copies
     takes at most 1/cooldown_factor of the time, however the traffic flaps,
   - no hold is on (hold_until_s: set by the caller after a merge that did not pay).
4. Merged: unmerge when the merged adapter's share < exit_share, or when its merged steps were measured
   slower than base steps of the same size (a dense float copy can be slower than the 4-bit base's
   kernel; base step). Otherwise keep; the step is
   - "merged" when every runnable request is the merged adapter's,
   - "base" when the others would otherwise wait past max_wait_s: their longest wait since their last
     step plus the next merged step's expected time reaches max_wait_s (this bound is dLoRA's credit:
     no request starves, and a base step serves the merged adapter's requests too),
   - "merged" otherwise.
   Moving to another adapter is an unmerge, then a merge of it under rule 3 (one adapter at a time).

Between exit_share and enter_share the current state stays, merged or not.
"""

import math
from dataclasses import dataclass, field
from typing import Mapping

BASE = ""      # the base model's adapter id: never merged


@dataclass(frozen=True)
class AutoMergeSettings:
    enter_share: float = 0.8       # merge the top adapter when its share is at least this
    exit_share: float = 0.5        # stay merged while its share is at least this
    min_requests: int = 4          # never merge for fewer of its runnable requests
    max_wait_s: float = 0.5        # the longest a request the merged set cannot run waits without a step
    switch_cost_s: float = 0.0     # measured time to build the merged copy (replace as it is measured)
    cooldown_factor: float = 10.0  # no merge before cooldown_factor x switch_cost_s since the last switch

    def __post_init__(self):
        if not 0.0 < self.exit_share <= self.enter_share <= 1.0:
            raise ValueError(f"need 0 < exit_share <= enter_share <= 1, "
                             f"got {self.exit_share} and {self.enter_share}")
        if self.min_requests < 1 or self.max_wait_s <= 0 or self.switch_cost_s < 0 or self.cooldown_factor < 0:
            raise ValueError("need min_requests >= 1, max_wait_s > 0, switch_cost_s >= 0, cooldown_factor >= 0")


@dataclass(frozen=True)
class QueueView:
    counts: Mapping[str, int] = field(default_factory=dict)   # runnable requests per adapter id ("": base)
    merged: str | None = None        # the merged adapter (or the one being merged), None when unmerged
    building: bool = False           # its copy is still being built
    other_wait_s: float = 0.0        # longest wait since its last step of a request the merged set can't run
    step_s: float = 0.0              # expected time of the next merged step
    now_s: float = 0.0
    last_switch_s: float = -math.inf  # when the last merge became ready or the last unmerge happened
    merged_slower: bool = False      # the merged copy's steps were measured slower than the base's
    hold_until_s: float = -math.inf  # no merge before this


@dataclass(frozen=True)
class Decision:
    action: str                  # "merge", "unmerge" or "keep"
    step: str | None             # "merged", "base", or None: nothing to run
    adapter_id: str | None = None  # the adapter to merge, for "merge"
    reason: str = ""


def decide(view: QueueView, s: AutoMergeSettings) -> Decision:
    counts = {a: n for a, n in view.counts.items() if n > 0}
    total = sum(counts.values())
    if total == 0:
        return Decision("keep", None, reason="idle")
    if view.merged is not None and view.building:
        return Decision("keep", "base", reason="building")

    if view.merged is None:
        adapters = {a: n for a, n in counts.items() if a != BASE}
        if not adapters:
            return Decision("keep", "base", reason="base model only")
        top_n = max(adapters.values())
        tops = [a for a, n in adapters.items() if n == top_n]
        if len(tops) > 1:
            return Decision("keep", "base", reason="tie")
        if top_n / total < s.enter_share:
            return Decision("keep", "base", reason="share below enter")
        if top_n < s.min_requests:
            return Decision("keep", "base", reason="too few requests")
        if view.now_s - view.last_switch_s < s.cooldown_factor * s.switch_cost_s:
            return Decision("keep", "base", reason="cooldown")
        if view.now_s < view.hold_until_s:
            return Decision("keep", "base", reason="held: merging did not pay")
        return Decision("merge", "base", tops[0], reason="dominant")

    mine = counts.get(view.merged, 0)
    if mine / total < s.exit_share:
        return Decision("unmerge", "base", reason="share below exit")
    if view.merged_slower:
        return Decision("unmerge", "base", reason="merged steps slower")
    if mine == total:
        return Decision("keep", "merged", reason="merged only")
    if view.other_wait_s + view.step_s >= s.max_wait_s:
        return Decision("keep", "base", reason="wait bound")
    return Decision("keep", "merged", reason="merged")
