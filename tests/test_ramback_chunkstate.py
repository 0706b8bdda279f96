"""ramback's compiled chunk states (appliance/_fast/chunkstate.pyx) against a plain-Python model.

The model is the obvious one: a list of states and a bytearray. Hypothesis drives both with
the same random operations and checks every answer, every count and every byte agree.
"""

import os

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from appliance._fast.chunkstate import CLEAN, DIRTY, EMPTY, FLUSHING, GROUP_CHUNKS, ChunkState, Mapping

PAGE = 4096


def make(length, shift):
    nchunks = (length + (1 << shift) - 1) >> shift
    data_off = PAGE + (nchunks + PAGE - 1) // PAGE * PAGE
    m = Mapping(-1, data_off + (nchunks << shift))
    return ChunkState(m, PAGE, data_off, length, shift), nchunks


class Model:
    def __init__(self, nchunks, length, shift):
        self.s = [EMPTY] * nchunks
        self.data = bytearray(length)
        self.length = length
        self.shift = shift

    def chunks(self, off, n):
        return off >> self.shift, ((off + n - 1) >> self.shift) + 1

    def mark_dirty(self, c0, c1):
        n = sum(1 for c in range(c0, c1) if self.s[c] != DIRTY)
        self.s[c0:c1] = [DIRTY] * (c1 - c0)
        return n

    def begin_flush(self, c0, c1):
        n = 0
        for c in range(c0, c1):
            if self.s[c] == DIRTY:
                self.s[c] = FLUSHING
                n += 1
        return n

    def end_flush(self, c0, c1, ok):
        n = 0
        for c in range(c0, c1):
            if self.s[c] == FLUSHING:
                self.s[c] = CLEAN if ok else DIRTY
                n += ok
        return n

    def install(self, c0, c1, src):
        n = 0
        base = c0 << self.shift
        for c in range(c0, c1):
            if self.s[c] == EMPTY:
                a, b = c << self.shift, min((c + 1) << self.shift, self.length)
                self.data[a:b] = src[a - base : b - base]
                self.s[c] = CLEAN
                n += 1
        return n

    def next_run(self, pos, end, mask, maxn, gap):
        end = min(end, len(self.s))
        start = next((c for c in range(max(pos, 0), end) if (1 << self.s[c]) & mask), None)
        if start is None:
            return None
        last = start + 1
        clean = 0
        c = start + 1
        while c < min(end, start + maxn):
            if (1 << self.s[c]) & mask:
                last, clean = c + 1, 0
            elif self.s[c] == CLEAN and clean < gap:
                clean += 1
            else:
                break
            c += 1
        return (start, last)

    def counts(self):
        return [self.s.count(x) for x in range(4)]


class ChunkStateMachine(RuleBasedStateMachine):
    @initialize(shape=st.sampled_from([(7 * 8192 + 512, 13), (5 * 4096, 12), (GROUP_CHUNKS * 2 * 512 + 512 + 100, 9)]))
    def setup(self, shape):
        length, shift = shape
        self.cs, n = make(length, shift)
        self.m = Model(n, length, shift)
        self.n = n
        self.length = length

    def _range(self, data):
        c0 = data.draw(st.integers(0, self.n - 1))
        c1 = data.draw(st.integers(c0, min(self.n, c0 + data.draw(st.sampled_from([1, 3, 40, GROUP_CHUNKS + 5])))))
        return c0, c1

    def _span(self, data):
        off = data.draw(st.integers(0, self.length - 1))
        n = data.draw(st.integers(1, min(self.length - off, 3 * (1 << self.m.shift))))
        return off, n

    @rule(data=st.data())
    def mark_dirty(self, data):
        c0, c1 = self._range(data)
        assert self.cs.mark_dirty(c0, c1) == self.m.mark_dirty(c0, c1)

    @rule(data=st.data())
    def begin_flush(self, data):
        c0, c1 = self._range(data)
        assert self.cs.begin_flush(c0, c1) == self.m.begin_flush(c0, c1)

    @rule(data=st.data(), ok=st.booleans())
    def end_flush(self, data, ok):
        c0, c1 = self._range(data)
        assert self.cs.end_flush(c0, c1, ok) == self.m.end_flush(c0, c1, ok)

    @rule(data=st.data())
    def install(self, data):
        c0, c1 = self._range(data)
        size = min(c1 << self.m.shift, self.length) - (c0 << self.m.shift)
        src = os.urandom(max(size, 0))
        assert self.cs.install(c0, c1, src) == self.m.install(c0, c1, src)

    @rule(data=st.data(), mask=st.integers(1, 15), maxn=st.sampled_from([1, 2, 7, 1 << 30]), gap=st.sampled_from([0, 1, 3]))
    def next_run(self, data, mask, maxn, gap):
        pos = data.draw(st.integers(0, self.n))
        end = data.draw(st.integers(pos, self.n + 2))
        assert self.cs.next_run(pos, end, mask, maxn, gap) == self.m.next_run(pos, end, mask, maxn, gap)

    @rule(data=st.data())
    def copy_in(self, data):
        off, n = self._span(data)
        src = os.urandom(n)
        self.cs.copy_in(off, src)
        self.m.data[off : off + n] = src

    @rule(data=st.data(), ok=st.booleans(), limit=st.sampled_from([1, 3, 10**9]))
    def fast_write(self, data, ok, limit):
        off, n = self._span(data)
        src = os.urandom(n)
        if ok:
            self.cs.enable_writes()
        else:
            self.cs.disable_writes()
        self.cs.limit_chunks = limit
        c0, c1 = self.m.chunks(off, n)
        dirty = self.m.counts()[DIRTY] + self.m.counts()[FLUSHING]
        expect = ok and EMPTY not in self.m.s[c0:c1] and not (dirty > 0 and dirty + (c1 - c0) > limit)
        assert self.cs.fast_write(off, src) == expect
        if expect:
            self.m.data[off : off + n] = src
            self.m.mark_dirty(c0, c1)

    @rule(data=st.data())
    def fast_read(self, data):
        off, n = self._span(data)
        buf = bytearray(n)
        c0, c1 = self.m.chunks(off, n)
        loaded = EMPTY not in self.m.s[c0:c1]
        assert self.cs.fast_read(off, buf) == loaded
        if loaded:
            assert buf == self.m.data[off : off + n]

    @precondition(lambda self: hasattr(self, "cs"))
    @rule()
    def recount(self):
        flushing = self.m.counts()[FLUSHING]
        assert self.cs.recount() == flushing
        self.m.s = [DIRTY if x == FLUSHING else x for x in self.m.s]

    @invariant()
    def agree(self):
        if not hasattr(self, "cs"):
            return
        assert self.cs.counts() == self.m.counts()
        assert self.cs.states(0, self.n) == bytes(self.m.s)
        # every byte agrees: both start as zeros and see the same copies
        out = bytearray(self.length)
        self.cs.copy_out(0, out)
        assert out == self.m.data


ChunkStateMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
test_chunk_states_match_the_python_model = ChunkStateMachine.TestCase


def test_a_device_of_one_chunk_and_one_sector_has_two_chunks():
    cs, n = make(4096 + 512, 12)
    assert n == 2 and cs.nchunks == 2
    assert cs.install(0, 2, bytes(range(256)) * 18) == 2
    assert cs.fast_write(4096, b"x" * 512) is False  # writes are off until enabled
    cs.enable_writes()
    assert cs.fast_write(4096, b"x" * 512)
    assert cs.fast_write(4096, b"x" * 513) is False  # past the end: declined, never clipped
    assert cs.counts() == [0, 1, 1, 0]


def test_disable_writes_turns_the_fast_path_off():
    cs, _ = make(8192, 12)
    cs.install(0, 2, bytes(8192))
    cs.enable_writes()
    assert cs.fast_write(0, b"a")
    cs.disable_writes()
    assert not cs.fast_write(0, b"b")
    assert cs.write_ok is False


@pytest.mark.parametrize("bad", [(-1, 2), (0, 99), (3, 2)])
def test_out_of_range_chunk_numbers_raise(bad):
    cs, _ = make(8192, 12)
    with pytest.raises(IndexError):
        cs.mark_dirty(*bad)
