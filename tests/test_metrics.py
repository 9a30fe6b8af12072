"""The bounded per-adapter request counter: at most N named series plus `other`, each only ever growing,
adding up to every request, with the busiest adapters named."""

import random

import pytest

from loraplex.server.metrics import TopAdapters


@pytest.mark.parametrize("n", [0, 1, 3, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_series_stay_bounded_monotonic_and_add_up(n, seed):
    rng = random.Random(seed)
    ids = [f"a{i}" for i in range(50)]
    weights = [1 / (i + 1) ** 1.2 for i in range(len(ids))]      # power-law popularity, as in production
    top, seen, total = TopAdapters(n), {}, 0
    for _ in range(3000):
        top.inc(rng.choices(ids, weights)[0])
        total += 1
        named, other = top.snapshot()
        series = {**named, "other": other}
        assert len(named) <= n
        assert sum(series.values()) == total
        for key, value in series.items():             # a series that goes on never goes down
            assert value >= seen.get(key, 0), key
        seen = series


def test_the_busiest_adapters_get_their_series():
    top = TopAdapters(2)
    for adapter_id, times in (("cold", 1), ("warm", 5), ("hot", 20)):
        for _ in range(times):
            top.inc(adapter_id)
    named, other = top.snapshot()
    # cold and warm took the two places first; hot took cold's place at its 3rd request (3 > 1.25 * 1 + 1)
    assert set(named) == {"warm", "hot"}
    assert named["warm"] == 5 and other == 1 + 2    # cold's request, and hot's two before it took the place
    assert named["hot"] == 20 - 2
