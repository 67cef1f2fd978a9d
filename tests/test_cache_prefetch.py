"""ExpertCache.admit_prefetch works on plain lists for speed; it must decide exactly as the
straightforward numpy definition below (the code it replaced), from any state."""
import numpy as np
import pytest

from sim.policies.cache import ExpertCache


def reference(cache, wanted, key, protect=None, only_if_better=False):
    copies, fresh, k = [], None, None
    res = cache.resident
    for at, layer, e in wanted:
        if res[layer, e]:
            continue
        if fresh is None:
            fresh = np.zeros_like(res)
        if int(np.count_nonzero(res[layer])) >= cache.capacity[layer]:
            cand = res[layer] & ~fresh[layer]
            if protect is not None:
                cand &= ~protect[layer]
            if not cand.any():
                continue
            if k is None:
                k = key()
                k = cache._expert_ids if k is None else k
            row = np.where(cand, k[layer], np.inf)
            victim = int(row.argmin())
            if only_if_better and row[victim] >= k[layer, e]:
                continue
            res[layer, victim] = False
        res[layer, e] = True
        fresh[layer, e] = True
        copies.append((at, layer, e))
    return (copies, fresh) if copies else ((), None)


@pytest.mark.parametrize("E", [8, 64])
def test_admit_prefetch_decides_as_the_numpy_definition(E):
    rng = np.random.default_rng(E)
    L = 6
    for trial in range(400):
        cap = rng.integers(1, E, L)
        a, b = ExpertCache(cap.copy(), E), ExpertCache(cap.copy(), E)
        start = np.zeros((L, E), dtype=bool)
        for layer in range(L):   # any state, full layers included
            start[layer, rng.choice(E, rng.integers(0, cap[layer] + 1), replace=False)] = True
        a.resident[:], b.resident[:] = start, start
        wanted = [(int(rng.integers(-1, 2 * L)), int(rng.integers(0, L)), int(rng.integers(0, E)))
                  for _ in range(int(rng.integers(0, 3 * E)))]
        kind = trial % 4
        keys = None if kind == 0 else rng.integers(0, 5, (L, E)).astype(float)   # ties on purpose
        if kind == 3:
            keys[rng.random((L, E)) < 0.3] = np.inf                              # "never used again"
        protect = rng.random((L, E)) < 0.3 if trial % 3 else None
        better = bool(trial % 2)
        got = a.admit_prefetch(wanted, lambda keys=keys: keys, protect, better)
        want = reference(b, wanted, lambda keys=keys: keys, protect, better)
        assert list(got[0]) == list(want[0])
        assert (got[1] is None) == (want[1] is None)
        if got[1] is not None:
            assert (got[1] == want[1]).all()
        assert (a.resident == b.resident).all()
