"""cow's grain maps (appliance/_fast/cowindex.pyx) against a plain-Python model: a list with a
value per grain. Hypothesis assigns random ranges (short ones that split and join runs across
many leaves, long ones that cut through them) and checks every lookup, that runs stay joined
(one run per stretch of one value: a read over one owner is one I/O) and that memory follows
the runs."""

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance._fast.cowindex import GrainMap, OwnerIndex

GRAINS = 6000

ops = st.lists(st.tuples(st.integers(0, GRAINS - 1), st.one_of(st.integers(1, 4), st.integers(1, 3000)),
                         st.integers(0, 3)), max_size=400)


def pieces_of(model, g0, g1):
    out = []
    for g in range(g0, g1):
        if out and out[-1][0] == model[g]:
            out[-1][2] = g + 1
        else:
            out.append([model[g], g, g + 1])
    return [tuple(p) for p in out]


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, GRAINS), st.integers(0, GRAINS))
def test_the_grain_map_follows_a_list_of_values(steps, x, y):
    m, model = GrainMap(GRAINS), [0] * GRAINS
    for a, n, v in steps:
        b = min(GRAINS, a + n)
        m.assign(a, b, v)
        model[a:b] = [v] * (b - a)
    g0, g1 = min(x, y), max(x, y)
    assert m.pieces(g0, g1) == pieces_of(model, g0, g1)
    assert m.pieces(0, GRAINS) == pieces_of(model, 0, GRAINS)
    assert m.runs == sum(1 for v, _, _ in pieces_of(model, 0, GRAINS) if v)  # touching runs joined
    assert all(m.value(g) == model[g] for g in range(0, GRAINS, 97))


def test_memory_follows_the_runs_not_the_grains():
    index = OwnerIndex(1 << 40)  # 4 PiB in 4 KiB grains
    index.set(5, 1 << 39, 1)
    for g in range(1000):
        index.set((1 << 39) + 2 * g, (1 << 39) + 2 * g + 1, 2 + g % 2)
    assert index.runs == 1001 and index.memory < 64 * 1024
    assert index.owner_runs((1 << 39) - 1, (1 << 39) + 3) == [(1, (1 << 39) - 1, 1 << 39), (2, 1 << 39, (1 << 39) + 1),
                                                              (0, (1 << 39) + 1, (1 << 39) + 2),
                                                              (3, (1 << 39) + 2, (1 << 39) + 3)]
