"""Bit runs in a plain bitmap (a bytearray, bit j of byte i is grain 8i+j): what a layer's
"allocated" and "zero" bitmaps are, and the loops a scan of them needs."""

from __future__ import annotations

import re


def set_bits(bits, g0, g1, value):
    """Set (or clear) bits [g0, g1) of `bits`: whole bytes by slice, the ends bit by bit."""
    while g0 < g1 and g0 & 7:
        set_bit(bits, g0, value)
        g0 += 1
    while g1 > g0 and g1 & 7:
        g1 -= 1
        set_bit(bits, g1, value)
    if g1 > g0:
        bits[g0 >> 3:g1 >> 3] = (b"\xff" if value else b"\0") * ((g1 - g0) >> 3)


def set_bit(bits, g, value):
    if value:
        bits[g >> 3] |= 1 << (g & 7)
    else:
        bits[g >> 3] &= ~(1 << (g & 7)) & 0xFF


_SET_BYTES = re.compile(rb"\xff+|[^\x00\xff]")  # a run of full bytes, or one mixed byte


def runs(bits, g0, g1):
    """Runs [(start, end)] of set bits in [g0, g1). The regex engine skips the zero bytes and
    takes runs of full bytes whole, so the cost follows the number of runs, not the layer's size."""
    out = []
    if g1 <= g0:
        return out
    for m in _SET_BYTES.finditer(bits, g0 >> 3, (g1 + 7) >> 3):
        i = m.start()
        if m.end() - i > 1 or bits[i] == 0xFF:
            _extend(out, max(i * 8, g0), min(m.end() * 8, g1))
            continue
        byte = bits[i]
        for j in range(8):
            g = i * 8 + j
            if byte >> j & 1 and g0 <= g < g1:
                _extend(out, g, g + 1)
    return out


def _extend(runs, lo, hi):
    if lo >= hi:
        return
    if runs and runs[-1][1] == lo:
        runs[-1] = (runs[-1][0], hi)
    else:
        runs.append((lo, hi))


def popcount(bits):
    step = 1 << 20
    return sum(int.from_bytes(bits[i:i + step], "little").bit_count() for i in range(0, len(bits), step))
