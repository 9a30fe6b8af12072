"""Which sequences the next step runs, and on which weights: the scheduler's choice, one weight set at a
time when an adapter is merged (weight_sets.py), by the --auto-merge rule when that is on (auto_planner.py).
Called by the engine's loop under its lock."""

from .scheduler import Batch, Scheduler


def next_batch(scheduler: Scheduler, weights, auto) -> Batch | None:
    """weights: the engine's WeightSets (None: adapters off); auto: its AutoPlanner or None. With merges,
    each request's weight set is fixed when it is first seen, and the sets with work take turns; the
    --auto-merge rule picks the set instead, and when its choice has nothing to run now, the sets take
    turns."""
    if weights is None:
        return scheduler.schedule()
    weights.collect()
    seqs = [seq for seq in (*scheduler.running, *scheduler.waiting) if not seq.adapter_pending]
    for seq in seqs:
        weights.assign(seq)
    if auto is not None:
        choice = auto.plan(seqs)
        if choice is not None and choice[0] is None:
            return None
        if choice is not None:
            _, runs, key = choice
            batch = scheduler.schedule(runs)
            if batch is not None:
                return _ran(batch, weights, key)
    sets = {seq.weight_set for seq in seqs}
    for key in weights.rotation(sets) if len(sets) > 1 else sets:
        batch = scheduler.schedule((lambda seq, key=key: seq.weight_set == key) if len(sets) > 1 else None)
        if batch is not None:
            return _ran(batch, weights, key)
    return None


def _ran(batch: Batch, weights, key) -> Batch:
    batch.weight_set = key
    weights.ran(key)
    return batch
