"""The cow target: reads from the topmost layer that holds a grain, writes into the writable
layer only, partial-grain copy-up, push while clients stay connected, the chain a table must
form, block status (base:allocation and qemu:allocation-depth), and what a FLUSH made durable
after a kill -9. Real daemons, qemu-io, nbdinfo, nbdsh; the layer files read after the daemon
is dead."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO, device, need, nbdsh_env, run, unwritten_pages, wait_for

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
SECTORS = SIZE // 512
BASE = 0x42  # the base's pattern in its first MiB; the rest of the base is a hole


def layer_create(path, size=SIZE, grain="4K"):
    run(sys.executable, "-m", "appliance", "layer", "create", str(path), "--size", str(size), "--grain", grain, cwd=REPO)
    return str(path)


def layer_info(path):
    return json.loads(run(sys.executable, "-m", "appliance", "layer", "info", str(path), "--json", cwd=REPO).stdout)


def make_base(tmp_path):
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(SIZE)
        f.write(bytes([BASE]) * MiB)
    return str(base)


def qemu_io(uri, *cmds, check=True):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def cow_device(base, layers, name="d"):
    return device(name, f"0 {SECTORS} cow {base} 0 {' '.join(map(str, layers))}")


def message(d, *words):
    return d.cli("message", "d", "0", *words).stdout


def build_stack(make_daemon, tmp_path, depth, name="build"):
    """A stack `depth` layers deep made as a user would: write, push, write... Layer i (1 = the
    bottom) holds pattern i in its own 64 KiB at i * 64 KiB, and grain 0; returns the daemon
    (stopped), the base and the layer paths, bottom first."""
    base = make_base(tmp_path)
    layers = [layer_create(tmp_path / "l1.layer")]
    d = make_daemon(cow_device(base, layers), name=name)
    for i in range(1, depth + 1):
        if i > 1:
            layers.append(str(tmp_path / f"l{i}.layer"))
            assert "pushed" in message(d, "push", layers[-1])  # created by the push
        qemu_io(d.uri("d"), f"write -P {i} {i * 64 * KiB} 64k", f"write -P {i} 0 4k")
    assert d.cli("table", "d").stdout.split() == f"0 {SECTORS} cow {base} 0 {' '.join(layers)}".split()
    d.stop()
    return base, layers


def expect_stack(uri, depth):
    cmds = [f"read -P {depth} 0 4k", f"read -P {BASE} 4k 60k"]
    for i in range(1, depth + 1):
        cmds.append(f"read -P {i} {i * 64 * KiB} 64k")
    end = (depth + 1) * 64 * KiB
    cmds += [f"read -P {BASE} {end} {MiB - end}", f"read -P 0 {MiB} {SIZE - MiB}"]
    qemu_io(uri, *cmds)


def test_reads_come_from_the_topmost_layer_through_1_3_and_8_layers(make_daemon, tmp_path):
    for depth in (1, 3, 8):
        sub = tmp_path / f"depth{depth}"
        sub.mkdir()
        base, layers = build_stack(make_daemon, sub, depth, name=f"build{depth}")
        # a fresh daemon on the full table: the owner index is built from the bitmaps on disk
        d = make_daemon(cow_device(base, layers), name=f"depth{depth}")
        expect_stack(d.uri("d"), depth)
        st = d.status("d")["devices"][0]["segments"][0]["status"]
        assert st["layers"] == depth and st["writable"] == layers[-1]
        d.stop()


def test_writes_land_only_in_the_writable_layer(make_daemon, tmp_path):
    base, layers = build_stack(make_daemon, tmp_path, 2)
    before = {p: digest(p) for p in [base, layers[0]]}
    top_before = layer_info(layers[1])["allocated_grains"]
    d = make_daemon(cow_device(base, layers), name="again")
    qemu_io(d.uri("d"), "write -P 0x77 0 256k", "write -P 0x78 7m 4k", "write -z 1m 64k", "flush")
    qemu_io(d.uri("d"), "read -P 0x77 0 256k", "read -P 0x78 7m 4k", "read -P 0 1m 64k")
    d.stop()
    assert {p: digest(p) for p in [base, layers[0]]} == before  # base and lower layer: byte for byte
    # 0..256k covers what the top held (grain 0 and its own 64 KiB): 64 + 1 + 16 grains now
    assert top_before == 17 and layer_info(layers[1])["allocated_grains"] == 64 + 1 + 16


def test_a_partial_grain_write_copies_the_grain_up_first(make_daemon, tmp_path):
    base = make_base(tmp_path)
    l1, l2 = layer_create(tmp_path / "l1.layer"), str(tmp_path / "l2.layer")
    d = make_daemon(cow_device(base, [l1]))
    qemu_io(d.uri("d"), "write -P 0x11 4096 4096")
    message(d, "push", l2)
    lower = digest(l1)
    # 100 bytes into a grain of l1, 1 byte into a grain of the base, and one across both
    qemu_io(d.uri("d"), "write -P 0x22 4146 100", "write -P 0x33 20000 1", "write -P 0x44 8000 400")
    qemu_io(d.uri("d"), "read -P 0x11 4096 50", "read -P 0x22 4146 100", "read -P 0x11 4246 3754",
            "read -P 0x44 8000 400", f"read -P {BASE} 8400 11600", "read -P 0x33 20000 1",
            f"read -P {BASE} 20001 100000")
    st = d.status("d")["devices"][0]["segments"][0]["status"]
    assert st["copy_ups"] == 3  # grain 1 (from l1), grain 4 (the base), grain 2 (the base; grain 1 is l2's by then)
    d.stop()
    assert digest(l1) == lower
    i = layer_info(l2)
    assert i["allocated_grains"] == 3  # grains 1, 2 and 4


def test_concurrent_partial_writes_to_one_grain_keep_each_others_bytes(make_daemon, tmp_path):
    need("nbdsh")
    base = make_base(tmp_path)
    l1 = layer_create(tmp_path / "l1.layer")
    d = make_daemon(cow_device(base, [l1]))
    # 64 one-sector writes to the same 8 grains, all in flight at once: each copies up or
    # waits for the grain's copy-up; none may lose another's bytes
    out = subprocess.run(["nbdsh", "-u", d.uri("d"), "-c", """
bufs = []
for g in range(8):
    for s in range(8):
        bufs.append(nbd.Buffer.from_bytearray(bytearray([g * 8 + s + 1]) * 512))
        h.aio_pwrite(bufs[-1], g * 4096 + s * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
data = h.pread(8 * 4096, 0)
bad = [(g, s) for g in range(8) for s in range(8)
       if data[g * 4096 + s * 512:(g * 4096) + (s + 1) * 512] != bytes([g * 8 + s + 1]) * 512]
print("bad", bad)
"""], capture_output=True, text=True, env=nbdsh_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bad []"


def test_push_while_a_client_writes_loses_nothing(make_daemon, tmp_path):
    need("fio")
    base = make_base(tmp_path)
    l1 = layer_create(tmp_path / "l1.layer")
    d = make_daemon(cow_device(base, [l1]))
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={d.uri('d')}", "--rw=randwrite", "--bs=4k",
                            "--size=4m", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--loops=40",
                            "--verify_state_save=0", f"--directory={tmp_path}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    pushed = []
    for i in range(2, 5):
        p = str(tmp_path / f"l{i}.layer")
        out = message(d, "push", p)
        assert "pushed" in out
        pushed.append(p)
    assert fio.poll() is None, "fio ended before the pushes: they must happen under its load"
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0, out
    table = d.cli("table", "d").stdout.split()
    assert table[-4:] == [l1] + pushed
    assert d.status("d")["devices"][0]["errors"] == 0


def test_a_restart_with_a_stale_config_refuses_the_sealed_layer(make_daemon, tmp_path):
    base = make_base(tmp_path)
    l1, l2 = layer_create(tmp_path / "l1.layer"), str(tmp_path / "l2.layer")
    d = make_daemon(cow_device(base, [l1]))
    message(d, "push", l2)
    child = layer_info(l2)["uuid"]
    status = d.cli("status").stdout
    assert "live table differs from the config" in status
    r = d.cli("message", "d", "0", "push", l1, check=False)  # a used layer is no new top
    assert r.returncode != 0 and f"{l1}: sealed" in r.stderr
    d.stop()
    r = d.cli("check-config", check=False)
    assert r.returncode != 0 and f"{l1}: sealed (layer {child} was pushed on it)" in r.stderr
    before = digest(l1)
    d.start(expect_ready=False)
    d.proc.wait(30)
    assert f"layer {child} was pushed on it" in d.log.read_text()
    assert digest(l1) == before


def test_a_table_that_does_not_chain_is_refused_naming_the_layer(make_daemon, tmp_path):
    base, layers = build_stack(make_daemon, tmp_path, 3)
    digests = {p: digest(p) for p in layers}
    other = layer_create(tmp_path / "other.layer", size=SIZE * 2)
    for table, words in (
        ([layers[1], layers[0], layers[2]], "wrong order"),
        ([layers[0], layers[2]], "missing"),
        ([layers[0], layers[1], other], "bytes"),
        ([layers[0], layers[1], layers[2], layers[2]], "a layer is in a stack once"),
    ):
        d = make_daemon(cow_device(base, table), name="bad", start=False)
        r = d.cli("check-config", check=False)
        assert r.returncode != 0, r.stdout
        assert "layer " in r.stderr and words in r.stderr, r.stderr
    assert {p: digest(p) for p in layers} == digests


def test_allocation_depth_says_which_layer_holds_each_range(make_daemon, tmp_path):
    need("nbdinfo")
    base, layers = build_stack(make_daemon, tmp_path, 3)
    d = make_daemon(cow_device(base, layers), name="again")
    out = run("nbdinfo", "--map=qemu:allocation-depth", "--json", d.uri("d")).stdout
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert got == [
        (0, 4 * KiB, 1),  # grain 0: the top
        (4 * KiB, 60 * KiB, 4),  # the base (depth 3 layers + 1)
        (64 * KiB, 64 * KiB, 3), (128 * KiB, 64 * KiB, 2), (192 * KiB, 64 * KiB, 1),
        (256 * KiB, MiB - 256 * KiB, 4),
        (MiB, SIZE - MiB, 0),  # a hole in the base: nothing anywhere
    ]
    alloc = json.loads(run("nbdinfo", "--map", "--json", d.uri("d")).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in alloc] == [(0, MiB, 0), (MiB, SIZE - MiB, 3)]


def test_writes_acknowledged_before_a_flush_survive_kill_9(make_daemon, tmp_path):
    need("nbdsh")
    base = make_base(tmp_path)
    l1, l2 = layer_create(tmp_path / "l1.layer"), str(tmp_path / "l2.layer")
    d = make_daemon(cow_device(base, [l1]))
    qemu_io(d.uri("d"), "write -P 0x11 0 1m")
    message(d, "push", l2)
    d.stop()
    d = make_daemon(cow_device(base, [l1, l2]), name="live")
    p = subprocess.Popen(["nbdsh", "-u", d.uri("d"), "-c", """
import random
rnd = random.Random(7)
for i in range(200):
    g = rnd.randrange(256)
    h.pwrite(bytes([i % 250 + 1]) * 512, g * 4096 + rnd.randrange(8) * 512)  # partial: copy-up
h.pwrite(b"\\x99" * 8192, 3 * 1024 * 1024)
h.flush()
print("flushed", flush=True)
import time
time.sleep(60)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nbdsh_env())
    assert p.stdout.readline().strip() == "flushed", p.stderr.read()
    assert unwritten_pages(l2) in (0, None)  # the FLUSH left nothing of the layer in the page cache
    d.kill()
    p.kill()
    p.wait()
    # the layer file, read with the daemon dead: the bits and the data
    info = layer_info(l2)
    with open(l2, "rb") as f:
        f.seek(info["data_offset"] + 3 * MiB)
        assert f.read(8192) == b"\x99" * 8192
    grains = 3 * MiB // 4096
    with open(l2, "rb") as f:
        f.seek(info["bitmap_offset"] + grains // 8 * 2)
        assert f.read(1)[0] & 0b11 == 0b11  # grains 768, 769 allocated
    d = make_daemon(cow_device(base, [l1, l2]), name="after")
    expect = subprocess.run(["nbdsh", "-u", d.uri("d"), "-c", """
import random
rnd = random.Random(7)
img = bytearray(b"\\x11" * (1 << 20))
for i in range(200):
    g = rnd.randrange(256)
    off = g * 4096 + rnd.randrange(8) * 512
    img[off:off + 512] = bytes([i % 250 + 1]) * 512
print(h.pread(1 << 20, 0) == bytes(img), h.pread(8192, 3 * 1024 * 1024) == b"\\x99" * 8192)
"""], capture_output=True, text=True, env=nbdsh_env(), timeout=60)
    assert expect.stdout.split() == ["True", "True"], expect.stderr


def hup(d):
    """SIGHUP, and wait until the daemon reloaded; its error (None when it worked)."""
    t = time.time()
    d.signal(signal.SIGHUP)
    last = wait_for(lambda: (d.status()["daemon"]["last_reload"] or {}).get("time", 0) > t and
                    d.status()["daemon"]["last_reload"], 20, "the reload")
    return last["error"]


def merged(d, timeout=30):
    """Wait until the merge is no longer running; the cow segment's status."""
    def status():
        st = d.status("d")["devices"][0]["segments"][0]["status"]
        return st if st.get("merge") != "running" else None
    return wait_for(status, timeout, "the merge's end")


def test_merge_folds_layers_into_the_one_under_them_and_the_stack_reads_the_same(make_daemon, tmp_path):
    base, layers = build_stack(make_daemon, tmp_path, 4)
    l3_uuid = layer_info(layers[2])["uuid"]
    d = make_daemon(cow_device(base, layers), name="live")
    qemu_io(d.uri("d"), "write -z 320k 64k")  # the top holds zeros there: stays above the merge
    message(d, "push", str(tmp_path / "l5.layer"))
    qemu_io(d.uri("d"), "write -P 0x55 8k 4k")
    for words, why in ((["merge", layers[0], layers[1]], "bottom layer"), (["merge", "2", "5"], "writable layer"),
                       (["merge", "3", "2"], "is above"), (["merge", "x", "2"], "no layer 'x'"),
                       (["cancel"], "no merge is running")):
        r = d.cli("message", "d", "0", *words, check=False)
        assert r.returncode != 0 and why in r.stderr, (words, r.stderr)
    assert "merging" in message(d, "merge", layers[1], layers[2])
    st = merged(d)
    assert st["merge"] == "done" and st["merge_progress"] == "100.0%" and st["layers"] == 3
    live = [layers[0], layers[3], str(tmp_path / "l5.layer")]
    assert d.cli("table", "d").stdout.split()[5:] == live
    checks = ["read -P 4 0 4k", "read -P 0x55 8k 4k", "read -P 1 64k 64k", "read -P 2 128k 64k",
              "read -P 3 192k 64k", "read -P 4 256k 64k", "read -P 0 320k 64k", f"read -P {BASE} 384k 640k",
              f"read -P 0 {MiB} {SIZE - MiB}"]
    qemu_io(d.uri("d"), *checks)
    d.stop()
    i = layer_info(layers[0])
    assert i["uuid"] == l3_uuid and i["pushed_on_it"] == layer_info(layers[3])["uuid"]
    assert run(sys.executable, "-m", "appliance", "layer", "check", layers[0], cwd=REPO).returncode == 0
    d = make_daemon(cow_device(base, live), name="after")  # the live table, from the layers on disk
    qemu_io(d.uri("d"), *checks)


def test_merge_and_push_while_fio_verifies(make_daemon, tmp_path):
    need("fio")
    base, layers = build_stack(make_daemon, tmp_path, 3)
    d = make_daemon(cow_device(base, layers), name="live")
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={d.uri('d')}", "--rw=randwrite", "--bs=4k", "--offset=4m",
           "--size=4m", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--loops=4", "--verify_state_save=0"]
    runs, stop = [], threading.Event()

    def load():  # verified fio runs back to back until the push and merge are done, however long they take
        while not stop.is_set() and len(runs) < 500:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
            runs.append((r.returncode, r.stdout + r.stderr))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_for(lambda: runs, 60, "a first verified fio run")
        message(d, "push", str(tmp_path / "l4.layer"))
        message(d, "merge", layers[1], layers[2])
        merged(d)
        message(d, "push", str(tmp_path / "l5.layer"))
        done = len(runs)
        wait_for(lambda: len(runs) > done + 1, 120, "a whole fio run on the new stack")
    finally:
        stop.set()
        loader.join(150)
    assert all(rc == 0 for rc, _ in runs), [out for rc, out in runs if rc][0]
    assert d.status("d")["devices"][0]["errors"] == 0
    qemu_io(d.uri("d"), "read -P 1 64k 64k", "read -P 2 128k 64k", "read -P 3 192k 64k", "read -P 3 0 4k")


def test_a_reload_to_the_live_table_keeps_the_writes_not_yet_flushed(make_daemon, tmp_path):
    need("nbdsh")
    base = make_base(tmp_path)
    l1, l2 = layer_create(tmp_path / "l1.layer"), str(tmp_path / "l2.layer")
    d = make_daemon(cow_device(base, [l1]))
    message(d, "push", l2)
    # written after the push, not flushed: its bits are in the live table's memory only
    out = subprocess.run(["nbdsh", "-u", d.uri("d"), "-c", "h.pwrite(b'\\x66' * 4096, 0)"],
                         capture_output=True, text=True, env=nbdsh_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "live table differs" in d.cli("status").stdout
    d.config.write_text(d.config.read_text().replace(f"0 {l1}", f"0 {l1} {l2}"))
    assert hup(d) is None
    qemu_io(d.uri("d"), "read -P 0x66 0 4k", f"read -P {BASE} 4k 4k")
    assert "live table differs" not in d.cli("status").stdout


def test_three_word_layers_mix_with_layer_files(make_daemon, tmp_path):
    base = make_base(tmp_path)
    l1 = layer_create(tmp_path / "l1.layer")
    bitmap, data = tmp_path / "w.bitmap", tmp_path / "w.data"
    bitmap.write_bytes(bytes(8 * KiB))  # all zeros: it gets its header when first attached
    with open(data, "wb") as f:
        f.truncate(SIZE + MiB)
    d = make_daemon(cow_device(base, [l1]), name="one")
    qemu_io(d.uri("d"), "write -P 0x11 0 64k")
    d.stop()
    seed = [l1, str(bitmap), str(data), "2048"]  # the data from sector 2048 (1 MiB) of w.data
    d = make_daemon(cow_device(base, seed), name="two")
    qemu_io(d.uri("d"), "write -P 0x22 32k 64k", "flush")
    qemu_io(d.uri("d"), "read -P 0x11 0 32k", "read -P 0x22 32k 64k", f"read -P {BASE} 96k 32k")
    assert d.cli("table", "d").stdout.split()[5:] == seed
    d.stop()
    info = layer_info(bitmap)
    assert info["parent"] == layer_info(l1)["uuid"] and info["allocated_grains"] == 16
    with open(data, "rb") as f:
        f.seek(MiB + 32 * KiB)
        assert f.read(64 * KiB) == b"\x22" * 64 * KiB
    d = make_daemon(cow_device(base, seed), name="three")
    qemu_io(d.uri("d"), "read -P 0x11 0 32k", "read -P 0x22 32k 64k")


def test_the_stack_equals_a_flattened_qcow2_chain_made_with_the_same_writes(make_daemon, tmp_path):
    need("qemu-img", "qemu-io")
    base = make_base(tmp_path)
    l1 = layer_create(tmp_path / "l1.layer")
    d = make_daemon(cow_device(base, [l1]))
    rounds = [["write -P 0x11 0 96k", "write -P 0x12 3000 5000"],
              ["write -P 0x21 64k 64k", "write -z 900k 100k", "write -z 2m 64k", "write -P 0x22 2m 100"],
              ["write -P 0x31 4094 4", "write -P 0x32 7m 1m"]]
    chain = [base]
    for i, cmds in enumerate(rounds, 1):
        if i > 1:
            message(d, "push", str(tmp_path / f"l{i}.layer"))
        qemu_io(d.uri("d"), *cmds)
        q = str(tmp_path / f"q{i}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", chain[-1], "-F", "raw" if i == 1 else "qcow2", q)
        run("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in cmds), []), q)
        chain.append(q)
    flat = str(tmp_path / "flat.raw")
    run("qemu-img", "convert", "-O", "raw", chain[-1], flat)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", flat, d.uri("d"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_layer_put_under_a_new_one_by_config_is_sealed_like_a_push(make_daemon, tmp_path):
    base = make_base(tmp_path)
    l1, l2 = layer_create(tmp_path / "l1.layer"), layer_create(tmp_path / "l2.layer")
    d = make_daemon(cow_device(base, [l1]))
    qemu_io(d.uri("d"), "write -P 0x11 0 4k")
    d.config.write_text(d.config.read_text().replace(f"0 {l1}", f"0 {l1} {l2}"))
    assert hup(d) is None
    qemu_io(d.uri("d"), "read -P 0x11 0 4k", "write -P 0x22 4k 4k")
    d.stop()
    i = layer_info(l1)
    assert i["sealed"] and i["pushed_on_it"] == layer_info(l2)["uuid"]
    d.config.write_text(d.config.read_text().replace(f"0 {l1} {l2}", f"0 {l1}"))
    r = d.cli("check-config", check=False)  # back to the old table: l1 may not take writes again
    assert r.returncode != 0 and f"{l1}: sealed" in r.stderr
