"""--auto-merge on the engine's loop: each step, the queue as auto_merge.decide sees it, and its decision
carried out (a merge started, an unmerge, and which requests the step runs).

A merge made here uses `dense`, so the merged adapter's requests are bound to no set: a merged step runs
those of its current version on the merged copy, a base step runs everyone (them through the LoRA path).
The rule's switch cost is the last measured build time. The rule sees each adapter's count of runnable
requests averaged over the last SMOOTH_S seconds: the instant counts swing with every request that ends
(measured on a tiny model at 90% of the traffic on one adapter: 20 merges and unmerges in 13 s on instant
counts). While an adapter is merged by hand, the rule stays out of the way.
"""

import logging
import math
import time
from dataclasses import replace
from typing import Callable

from .auto_merge import BASE, AutoMergeSettings, QueueView, decide
from .weight_sets import WeightSets, log_failure

log = logging.getLogger(__name__)

METHOD = "dense"
STEP_EMA = 0.2          # weight of the newest merged step in the expected merged-step time
SMOOTH_S = 1.0          # time constant of the averaged counts the rule sees


class AutoPlanner:
    def __init__(self, weights: WeightSets, settings: AutoMergeSettings = AutoMergeSettings()):
        self.weights = weights
        self.settings = settings
        self.step_s = 0.0                  # expected time of a merged step (moving average)
        self.longest_other_wait = 0.0      # the longest any request waited for a step while one was merged
        self._counts: dict[str, float] = {}   # runnable requests per adapter, averaged over SMOOTH_S
        self._seen = None                  # time of the last plan

    def plan(self, seqs: list, now: float | None = None) -> tuple[str | None, Callable | None, tuple | None]:
        """For the runnable `seqs`: (which step, "merged" / "base" / None for none, the filter of its
        sequences, the weight set key)."""
        now = time.monotonic() if now is None else now
        current, merged, building = self.weights.current()
        if merged is not None and not self.weights.auto and not building:
            return "manual", None, None                        # a merge by hand: fixed sets
        on_copy = (lambda seq: current is not None and seq.adapter_key == current[:2])
        others = [seq for seq in seqs if not on_copy(seq)]
        wait = max((now - (seq.last_token_time or seq.arrival) for seq in others), default=0.0)
        if merged is not None:
            self.longest_other_wait = max(self.longest_other_wait, wait)
        settings = replace(self.settings, switch_cost_s=self.weights.last_build_s)
        decision = decide(QueueView(self._smoothed(seqs, now), merged, building, wait, self.step_s, now,
                                    self.weights.last_switch), settings)
        self._act(decision)
        if decision.step == "merged" and current is not None and self.weights.auto:
            return "merged", on_copy, current
        return decision.step, None, None

    def _smoothed(self, seqs: list, now: float) -> dict[str, float]:
        counts: dict[str, int] = {}
        for seq in seqs:
            adapter = seq.request.adapter_id or BASE
            counts[adapter] = counts.get(adapter, 0) + 1
        weight = 1.0 if self._seen is None else 1 - math.exp(-(now - self._seen) / SMOOTH_S)
        self._seen = now
        for adapter in set(counts) | set(self._counts):
            value = (1 - weight) * self._counts.get(adapter, 0.0) + weight * counts.get(adapter, 0)
            if value < 0.01:
                self._counts.pop(adapter, None)
            else:
                self._counts[adapter] = value
        return {adapter: value for adapter, value in self._counts.items()} if seqs else {}

    def merged_step_took(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s == 0 else (1 - STEP_EMA) * self.step_s + STEP_EMA * seconds

    def _act(self, decision) -> None:
        try:
            if decision.action == "merge":
                log.info("auto-merge: merging %s (%s)", decision.adapter_id, decision.reason)
                self.weights.merge(decision.adapter_id, METHOD, auto=True).add_done_callback(log_failure)
            elif decision.action == "unmerge":
                log.info("auto-merge: unmerging (%s)", decision.reason)
                self.weights.unmerge()
        except Exception:   # noqa: BLE001 - a merge by hand got there first: the rule steps aside
            log.debug("auto-merge: %s not done", decision.action, exc_info=True)
