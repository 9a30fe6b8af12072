"""--auto-merge on the engine's loop: each step, the queue as auto_merge.decide sees it, and its decision
carried out (a merge started, an unmerge, and which requests the step runs).

The method is the server's --merge-method, `dense` unless `requantize` is asked for. A `dense` copy computes
what the LoRA path does, so the merged adapter's requests are bound to no set: a merged step runs those of
its current version on the copy, a base step runs everyone (them through the LoRA path). A `requantize` copy
answers differently, so each request keeps the set it started on (weight_sets.assign): a merged step runs
the requests bound to the copy, a base step the unbound ones, and a set whose requests have waited past the
bound gets the step (the copy's requests after an unmerge, say). The rule's switch cost is the last measured
build time. The rule sees each adapter's count of runnable requests averaged over the last SMOOTH_S seconds:
the instant counts swing with every request that ends (measured on a tiny model at 90% of the traffic on one
adapter: 20 merges and unmerges in 13 s on instant counts). While an adapter is merged by hand, the rule
stays out of the way.

A merge must pay: each merged decode step is timed against the base's decode steps of the same batch size
(StepTimes; with `dense`, a merged step of a size the base has not run is followed by one base step, to
time it). When the median of the first JUDGE_STEPS is not faster, the copy is dropped and no merge
starts for HOLD_S seconds, twice that after the next such merge, and so on (measured on a 2-core CPU with
AVX512-BF16: a float32 dense copy decodes a batch of 16 at 0.67x the LoRA path's speed, the fused 4-bit
kernel being faster than a float32 GEMM there; docs/benchmarks-adapters.md).
"""

import logging
import math
import statistics
import time
from dataclasses import replace
from typing import Callable

from .auto_merge import BASE, AutoMergeSettings, QueueView, decide
from .weight_sets import WeightSets, log_failure

log = logging.getLogger(__name__)

STEP_EMA = 0.2          # weight of the newest merged step in the expected merged-step time
SMOOTH_S = 1.0          # time constant of the averaged counts the rule sees
JUDGE_STEPS = 16        # merged decode steps compared with the base's before a merge is judged
HOLD_S = 60.0           # no merge for this long after the first merge that did not pay; doubled each time


class StepTimes:
    """Decode step times on the base by batch size (moving averages), and each merged decode step's time
    over the base's at its size since the current copy was installed."""

    def __init__(self):
        self.base: dict[int, float] = {}
        self.ratios: list[float] = []
        self.copy = None           # the copy the ratios are for
        self.fresh: set[int] = set()   # batch sizes the base ran since that copy was installed
        self.probe = False         # a merged step of a size not fresh: time a base step of it

    def took(self, key, rows: int, seconds: float) -> None:
        """A decode step of `rows` sequences on weight set `key` (None: the base). A merged step is compared
        only with base steps run since its copy was installed: those run while it was being built shared the
        CPU with the build (measured: 2-4x slower on 2 cores) and would make any copy look fast."""
        if key is None:
            old = self.base.get(rows) if rows in self.fresh else None
            self.base[rows] = seconds if old is None else (1 - STEP_EMA) * old + STEP_EMA * seconds
            self.fresh.add(rows)
            return
        if key != self.copy:
            self.copy, self.ratios, self.fresh = key, [], set()
        if len(self.ratios) < JUDGE_STEPS:
            if rows in self.fresh:
                self.ratios.append(seconds / self.base[rows])
            else:
                self.probe = True

    def take_probe(self) -> bool:
        probe, self.probe = self.probe, False
        return probe

    def slower(self, key) -> bool:
        """The copy `key` was measured no faster than the base (its first JUDGE_STEPS decode steps)."""
        return key == self.copy and len(self.ratios) >= JUDGE_STEPS and statistics.median(self.ratios) >= 1.0


class AutoPlanner:
    def __init__(self, weights: WeightSets, settings: AutoMergeSettings = AutoMergeSettings(), method: str = "dense"):
        self.weights = weights
        self.settings = settings
        self.method = method
        self.step_s = 0.0                  # expected time of a merged step (moving average)
        self.longest_other_wait = 0.0      # the longest any request waited for a step while one was merged
        self._counts: dict[str, float] = {}   # runnable requests per adapter, averaged over SMOOTH_S
        self._seen = None                  # time of the last plan
        self.times = StepTimes()
        self.holds = 0                     # merges dropped for not paying
        self.hold_until = -math.inf

    def plan(self, seqs: list, now: float | None = None) -> tuple[str | None, Callable | None, tuple | None] | None:
        """For the runnable `seqs`: (which step, "merged" / "base" / None for none; the filter of its
        sequences; the weight set key), or None while an adapter is merged by hand (fixed sets)."""
        now = time.monotonic() if now is None else now
        current, merged, building = self.weights.current()
        if merged is not None and not self.weights.auto and not building:
            return None
        movable = self.weights.movable

        def on_copy(seq) -> bool:
            if current is None:
                return False
            return seq.weight_set == current or (movable and seq.adapter_key == current[:2])

        wait = max((_waited(seq, now) for seq in seqs if not on_copy(seq)), default=0.0)
        if merged is not None:
            self.longest_other_wait = max(self.longest_other_wait, wait)
        settings = replace(self.settings, switch_cost_s=self.weights.last_build_s)
        slower = current is not None and self.weights.auto and self.times.slower(current)
        decision = decide(QueueView(self._smoothed(seqs, now), merged, building, wait, self.step_s, now,
                                    self.weights.last_switch, slower, self.hold_until), settings)
        self._act(decision, now)
        if decision.step is None:
            return None, None, None
        merged_step = decision.step == "merged" and current is not None and self.weights.auto
        if merged_step and self.weights.movable and self.times.take_probe():
            merged_step = False        # a base step of the size just run on the copy, to time the copy against
        key = current if merged_step else None
        key = self._starving(seqs, key, now)
        if key is None:
            return "base", (lambda seq: seq.weight_set is None), None
        return "merged", (on_copy if key == current else (lambda seq: seq.weight_set == key)), key

    def _starving(self, seqs: list, key, now: float):
        """The set to run: `key`, unless requests bound to another merged copy have waited past the bound
        (the one waiting longest then). The base's wait is the rule's."""
        waits: dict = {}
        for seq in seqs:
            if seq.weight_set is not None and seq.weight_set != key:
                waits[seq.weight_set] = max(waits.get(seq.weight_set, 0.0), _waited(seq, now))
        late = max(waits, key=waits.get, default=key)
        return late if waits.get(late, 0.0) >= self.settings.max_wait_s else key

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

    def step_took(self, batch, seconds: float) -> None:
        """Called by the loop after each step."""
        if batch.weight_set is not None:
            self.step_s = seconds if self.step_s == 0 else (1 - STEP_EMA) * self.step_s + STEP_EMA * seconds
        if not batch.prefill:
            self.times.took(batch.weight_set, len(batch.seqs), seconds)

    def _act(self, decision, now: float) -> None:
        try:
            if decision.action == "merge":
                log.info("auto-merge: merging %s (%s)", decision.adapter_id, decision.reason)
                self.weights.merge(decision.adapter_id, self.method, auto=True).add_done_callback(log_failure)
            elif decision.action == "unmerge":
                log.info("auto-merge: unmerging (%s)", decision.reason)
                self.weights.unmerge()
                if decision.reason == "merged steps slower":
                    self._hold(now)
        except Exception:   # noqa: BLE001 - a merge by hand got there first: the rule steps aside
            log.debug("auto-merge: %s not done", decision.action, exc_info=True)

    def _hold(self, now: float) -> None:
        self.hold_until, self.holds = now + HOLD_S * 2 ** self.holds, self.holds + 1
        log.warning("auto-merge: the %s copy's decode steps took %.2fx the base's at the same batch sizes "
                    "(median of %d); no merge for %.0f s", self.method, statistics.median(self.times.ratios),
                    len(self.times.ratios), self.hold_until - now)


def _waited(seq, now: float) -> float:
    """Seconds since the request's last token (or its arrival)."""
    return now - (seq.last_token_time or seq.arrival)
