"""Several NBD connections write random overlapping ranges into a ramback while it populates
and while its mode flips between writeback and writethrough and its dirty limit changes;
at the end the device, the RAM store and the backing file are the same bytes, and every
sector holds what a plain-Python model allows.

The model: every sector a write covers is stamped with (writer, seq, sector). Each writer
has one request in flight at a time and logs when each write began and was acknowledged.
A sector's final content must be the stamp of a write that covered it, and no write that
covered it may have begun after that write was acknowledged (it would be newer); a sector
no write covered holds backing's original bytes.
"""

from __future__ import annotations

import json
import struct
import time

from test_ramback import (
    device,
    device_bytes,
    message,
    nbd_script,
    random_file,
    rb_status,
    store_data,
    wait_for,
)

WRITERS = 4
SIZE = 32 << 20
HOT = 1 << 20  # most writes land in the first MiB: they overlap a lot
SWITCHES = 10  # mode switches while the writers write

WORKER = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
wid, size, hot = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = open(sys.argv[5], "w", buffering=1)
rnd = random.Random(wid * 7919)
orig = open(sys.argv[6], "rb")
deadline = time.monotonic() + float(sys.argv[7])
stop = sys.argv[8]  # the controller's: it has switched modes often enough

def stamp(seq, off, n):
    out = bytearray()
    for sector in range(off // 512, (off + n) // 512):
        out += struct.pack("<HHIQ", wid, 0xabcd, seq, sector) + bytes([(wid * 7 + seq * 13 + sector) % 256]) * 496
    return bytes(out)

seq = 0
while seq < 4000 and time.monotonic() < deadline and not (seq >= 60 and os.path.exists(stop)):
    n = rnd.choice([512, 1024, 3584, 4096, 8192, 12800, 65536])
    top = hot if rnd.random() < 0.7 else size
    off = rnd.randrange(0, top - n) // 512 * 512
    if rnd.random() < 0.15:
        h.pread(n, off)  # served during populate too; what it may hold is checked at the end
    t0 = time.monotonic()
    h.pwrite(stamp(seq, off, n), off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
    t1 = time.monotonic()
    log.write(json.dumps([wid, seq, off, n, t0, t1]) + "\\n")
    seq += 1
    if rnd.random() < 0.05:
        h.flush()
"""


def check_against_model(final, original, logs):
    cover = {}
    writes = {}
    for path in logs:
        for line in open(path):
            wid, seq, off, n, t0, t1 = json.loads(line)
            writes[(wid, seq)] = (t0, t1)
            for sector in range(off // 512, (off + n) // 512):
                cover.setdefault(sector, []).append((wid, seq))
    assert len(writes) > 200, "the writers did too little to test anything"
    for sector in range(len(final) // 512):
        got = final[sector * 512 : (sector + 1) * 512]
        ws = cover.get(sector)
        if not ws:
            assert got == original[sector * 512 : (sector + 1) * 512], f"sector {sector}: no write covered it"
            continue
        wid, magic, seq, stamped = struct.unpack_from("<HHIQ", got)
        assert magic == 0xABCD and stamped == sector and (wid, seq) in ws, f"sector {sector}: not a stamp of a write to it"
        assert got[16:] == bytes([(wid * 7 + seq * 13 + sector) % 256]) * 496, f"sector {sector}: torn"
        done = writes[(wid, seq)][1]
        newer = [w for w in ws if writes[w][0] > done]
        assert not newer, f"sector {sector}: holds write {(wid, seq)}, but {newer[0]} began after it was acknowledged"


def test_concurrent_overlapping_writes_across_populate_and_mode_switches(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", SIZE, seed=23)
    original = open(img, "rb").read()
    orig_copy = tmp_path / "orig.img"
    orig_copy.write_bytes(original)
    sectors = SIZE // 512
    d = make_daemon(
        device("slow", f"0 {sectors} delay {img} 0 3000 {img} 0 1", export=False)
        + device("rb", f"0 {sectors} ramback - @slow chunk=4096")
    )
    logs = [tmp_path / f"worker{w}.log" for w in range(WRITERS)]
    stop = tmp_path / "stop"
    workers = [
        nbd_script(WORKER, d.uri("rb"), w, SIZE, 1 << 20, logs[w], orig_copy, 60.0, stop, background=True)
        for w in range(WRITERS)
    ]
    seen = []
    modes = ["writeback", "writethrough"]
    i = 0
    deadline = time.monotonic() + 60
    # the writers write until the switching is done and each has written enough, however slow
    # the CLI or the loads are on a loaded machine; the switching goes on while they write
    while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
        seen.append(rb_status(d))
        message(d, modes[i % 2])
        if i % 5 == 2:
            message(d, "max_dirty", "1M")  # writers at the limit are throttled, not failed
        elif i % 5 == 4:
            message(d, "max_dirty", "30s")
        i += 1
        if i == SWITCHES:
            stop.touch()
        time.sleep(0.25)
    for p in workers:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
    assert any(not s["populated"] for s in seen), "populate was over before the writers began"
    assert i >= SWITCHES, "the writers stopped before the mode switches were done"

    message(d, "writethrough")
    assert message(d, "flush") == "clean"
    s = wait_for(d, lambda s: s["dirty"] == 0 and s["populated"], timeout=30)
    final = device_bytes(d, "rb", tmp_path)
    assert store_data(s["store"]) == final, "the RAM store differs from what the device reads"
    assert open(img, "rb").read() == final, "backing differs from the device after the drain"
    check_against_model(final, original, logs)
