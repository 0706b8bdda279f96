"""cow layers on disk: `appliance layer create|info|check`, the two forms (one file; bitmap,
data, offset), sealing, and the bitmap's write order proven by what reached the disk after a
kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import REPO, run, unwritten_pages
from appliance.targets.cow import offline
from appliance.targets.cow.layer import HEADER_AREA, LayerError, open_layer

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def layer_cli(*args, check=True):
    return run(sys.executable, "-m", "appliance", "layer", *map(str, args), check=check, cwd=REPO)


def info(path):
    return json.loads(layer_cli("info", path, "--json").stdout)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


# create, info, check


def test_create_info_check_round_trip_on_a_sparse_file(tmp_path):
    path = tmp_path / "w.layer"
    out = layer_cli("create", path, "--size", "1G").stdout
    i = info(path)
    assert i["uuid"] in out
    assert (i["size"], i["grain"], i["grains"]) == (GiB, 4096, GiB // 4096)
    assert (i["parent"], i["sealed"], i["allocated_bytes"]) == (None, False, 0)
    assert i["bitmap_offset"] == HEADER_AREA and i["data_offset"] >= HEADER_AREA + i["bitmap_length"]
    assert os.path.getsize(path) == i["data_offset"] + GiB
    assert os.stat(path).st_blocks * 512 <= HEADER_AREA + i["bitmap_length"]  # sparse: the data is a hole
    assert f"{path}: OK" in layer_cli("check", path).stdout
    text = layer_cli("info", path).stdout
    assert "parent     none yet" in text and "sealed     no" in text


def test_info_shows_allocated_bytes_parent_and_seal(tmp_path):
    path = str(tmp_path / "w.layer")
    layer_cli("create", path, "--size", "16M", "--grain", "64K")
    parent, child = uuid.uuid4(), uuid.uuid4()
    layer = open_layer([path], writable=True)
    os.pwrite(layer.data_fd, b"d" * 3 * 64 * KiB, layer.data_offset + 10 * 64 * KiB)
    layer.mark_allocated(10, 13)
    layer.mark_zero(100, 110)
    layer.set_parent(parent)
    layer.seal(child)
    layer.close()
    i = info(path)
    assert (i["grain"], i["allocated_bytes"], i["zero_grains"]) == (64 * KiB, 3 * 64 * KiB, 10)
    assert (i["parent"], i["sealed"], i["pushed_on_it"]) == (str(parent), True, str(child))
    assert f"sealed     yes (layer {child} was pushed on it)" in layer_cli("info", path).stdout
    layer_cli("check", path)


@pytest.mark.parametrize("size,grain,want_size,want_grain", [
    ("4096", "512", 4096, 512),
    ("1M", "4K", MiB, 4096),
    ("512k", "1M", 512 * KiB, MiB),
    ("3G", "64KiB", 3 * GiB, 64 * KiB),
    ("2T", "64K", 2 << 40, 64 * KiB),
])
def test_sizes_take_k_m_g_t_suffixes_and_a_bare_number_is_bytes(tmp_path, size, grain, want_size, want_grain):
    path = tmp_path / "w.layer"
    layer_cli("create", path, "--size", size, "--grain", grain)
    i = info(path)
    assert (i["size"], i["grain"]) == (want_size, want_grain)
    layer_cli("check", path)


@pytest.mark.parametrize("args,words", [
    (["--size", "12Q"], "--size '12Q' is not a size"),
    (["--size", "1000"], "size 1000 is not a positive multiple of 512"),
    (["--size", "0"], "size 0 is not a positive multiple of 512"),
    (["--size", "1M", "--grain", "3000"], "grain 3000 is not a power of two from 512 to 1048576"),
    (["--size", "1M", "--grain", "256"], "grain 256 is not a power of two"),
    (["--size", "1M", "--grain", "2M"], "grain 2097152 is not a power of two"),
])
def test_a_bad_size_or_grain_is_refused_naming_it_and_creates_nothing(tmp_path, args, words):
    path = tmp_path / "w.layer"
    r = layer_cli("create", path, *args, check=False)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert not path.exists()


def test_create_refuses_to_overwrite_a_layer_or_a_non_empty_file_without_force(tmp_path):
    path = tmp_path / "w.layer"
    layer_cli("create", path, "--size", "1M")
    old = info(path)["uuid"]
    r = layer_cli("create", path, "--size", "2M", check=False)
    assert r.returncode == 1 and f"already holds a cow layer ({old}); --force overwrites it" in r.stderr
    assert info(path)["uuid"] == old

    data = tmp_path / "precious.img"
    data.write_bytes(b"keep me" * 100)
    r = layer_cli("create", data, "--size", "1M", check=False)
    assert r.returncode == 1 and "not empty (700 bytes); --force overwrites it" in r.stderr
    assert data.read_bytes() == b"keep me" * 100

    layer_cli("create", path, "--size", "2M", "--force")
    assert info(path)["uuid"] != old and info(path)["size"] == 2 * MiB


# damage


def test_check_names_a_damaged_header_and_exits_1(tmp_path):
    path = tmp_path / "w.layer"
    layer_cli("create", path, "--size", "8M")
    flip(path, 72)  # a bit of the size field
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and f"{path}: header checksum mismatch (stored 0x" in r.stderr, r.stderr
    flip(path, 72)
    layer_cli("check", path)
    flip(path, 2)  # the magic
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and "bad magic" in r.stderr and "not a cow layer" in r.stderr
    with pytest.raises(LayerError, match="bad magic"):
        open_layer([str(path)], writable=True)  # a layer with a bad magic is never attached


def test_check_names_a_short_file_and_a_damaged_bitmap(tmp_path):
    path = tmp_path / "w.layer"
    layer_cli("create", path, "--size", "8M")
    i = info(path)
    os.truncate(path, i["data_offset"] + 4 * MiB)
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and f"the header needs {i['data_offset'] + 8 * MiB}" in r.stderr
    os.truncate(path, i["data_offset"] + 8 * MiB)
    layer_cli("check", path)

    flip(path, HEADER_AREA + 2 * 5 + 1)  # a "zero" bit of grain 8*5+6 without its "allocated" bit
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and "bitmap damaged: grain 46 is marked zero but not allocated" in r.stderr
    flip(path, HEADER_AREA + 2 * 5 + 1)
    flip(path, HEADER_AREA + i["bitmap_length"] - 1)  # past the last grain
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and "bits set past the last grain (2047)" in r.stderr


def test_check_of_a_file_that_is_no_layer_says_so(tmp_path, image):
    path = image("zeros.img", MiB)
    r = layer_cli("check", path, check=False)
    assert r.returncode == 1 and "not a cow layer (no header" in r.stderr
    r = layer_cli("check", tmp_path / "missing", check=False)
    assert r.returncode == 1 and "cannot open: No such file or directory" in r.stderr


# sealing and identity


def test_a_sealed_layer_is_never_attached_writable_and_the_refusal_names_the_layer_pushed_on_it(tmp_path):
    path = str(tmp_path / "w.layer")
    layer_cli("create", path, "--size", "1M")
    child = uuid.uuid4()
    layer = open_layer([path], writable=True)
    layer.seal(child)
    with pytest.raises(LayerError, match="not the writable layer"):
        layer.mark_allocated(0, 1)
    layer.close()
    with pytest.raises(LayerError, match=f"sealed \\(layer {child} was pushed on it\\); a sealed layer is never"):
        open_layer([path], writable=True)
    open_layer([path], writable=False).close()


def test_a_layer_keeps_its_first_parent(tmp_path):
    path = str(tmp_path / "w.layer")
    layer_cli("create", path, "--size", "1M")
    first, other = uuid.uuid4(), uuid.uuid4()
    layer = open_layer([path], writable=True)
    layer.set_parent(first)
    layer.set_parent(first)
    with pytest.raises(LayerError, match=f"its parent is {first}, not {other}"):
        layer.set_parent(other)
    layer.close()
    assert info(path)["parent"] == str(first)


def test_cow_is_a_table_keyword_whose_devices_check_config_checks(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[device]]\nname = "d"\ntable = ["0 8 cow /x 0"]\n')
    r = run(sys.executable, "-m", "appliance", "check-config", str(cfg), check=False, cwd=REPO)
    assert r.returncode == 1 and "cow: /x: no such file" in r.stderr


# the three-word form


def test_three_word_form_an_unused_bitmap_device_gets_its_header_on_first_use(image):
    bitmap, data = image("bitmap.img", 64 * KiB), image("data.img", 8192 + 4 * MiB)
    with pytest.raises(LayerError, match="unused bitmap device"):
        open_layer([bitmap, data, "8192"], writable=False)
    layer = open_layer([bitmap, data, "8192"], writable=True, size=4 * MiB, grain=4096)
    assert open(bitmap, "rb").read() == bytes(64 * KiB)  # attaching writes nothing
    assert layer.data_offset == 8192 and layer.data_fd != layer.bitmap_fd
    os.pwrite(layer.data_fd, b"g" * 4096, 8192 + 7 * 4096)
    layer.mark_allocated(7, 8)
    layer.sync_bitmap()
    layer.close()

    layer = open_layer([bitmap, data, "8192"], writable=False)
    assert layer.allocated_runs() == [(7, 8)]
    assert os.pread(layer.data_fd, 4096, layer.data_offset + 7 * layer.grain) == b"g" * 4096
    layer.close()
    i = info(bitmap)
    assert (i["size"], i["data_offset"], i["data_on"], i["allocated_bytes"]) == (4 * MiB, 8192, "data device", 4096)
    layer_cli("check", bitmap, "--data", data)

    with pytest.raises(LayerError, match="its data is at offset 8192 of the data device, the table says 0"):
        open_layer([bitmap, data, "0"], writable=True)
    with pytest.raises(LayerError, match="a three-word .* layer, named as a one-file one"):
        open_layer([bitmap], writable=True)
    os.truncate(data, 4 * MiB)
    r = layer_cli("check", bitmap, "--data", data, check=False)
    assert r.returncode == 1 and f"the data device holds {4 * MiB} bytes, the layer needs {8192 + 4 * MiB}" in r.stderr


def test_three_word_form_refuses_an_unused_bitmap_device_that_is_not_zeroed(image):
    bitmap, data = image("bitmap.img", 64 * KiB), image("data.img", 4 * MiB)
    with open(bitmap, "r+b") as f:
        f.seek(HEADER_AREA + 100)
        f.write(b"\x01")
    with pytest.raises(LayerError, match="bitmap is not all zeros; zero it first"):
        open_layer([bitmap, data, "0"], writable=True, size=4 * MiB)


# write order: data before the bit that exposes it


WRITER = """
import os, sys
from appliance.targets.cow.layer import open_layer
layer = open_layer(sys.argv[1:], writable=True, size=64 << 20)
runs = layer.allocated_runs()
start = runs[-1][1] if runs else 0  # where the killed writer before it left off
g, per_round = layer.grain, 32
for r in range(10**6):
    first = start + r * per_round
    if first + per_round > layer.grains:
        break
    for i in range(first, first + per_round):  # fresh grains: each is written once (a copy-up)
        os.pwrite(layer.data_fd, i.to_bytes(8, "little") * (g // 8), layer.data_offset + i * g)
    layer.mark_allocated(first, first + per_round)
    if r % 4 == 3:
        layer.sync_bitmap()
        print(first + per_round, flush=True)  # every grain below this had its FLUSH
"""


def kill_writer_midway(words, delay):
    """Run WRITER until it has synced 10 times, let it go on for `delay` seconds, kill -9 it;
    the grains below the last sync it reported complete."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, *words], cwd=REPO, stdout=subprocess.PIPE, text=True)
    reports = []
    deadline = time.monotonic() + 20
    while len(reports) < 10 and time.monotonic() < deadline:
        reports.append(int(proc.stdout.readline() or 0))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(reports) == 10 and reports[-1], "the writer made too little progress"
    return max(reports + [int(w) for w in proc.stdout.read().split()])


@pytest.mark.parametrize("form", ["one-file", "three-word"])
def test_kill_9_during_writes_and_syncs_never_leaves_a_bit_whose_data_is_not_on_disk(tmp_path, image, form):
    if form == "one-file":
        words = [str(tmp_path / "w.layer")]
        layer_cli("create", words[0], "--size", "64M")
    else:  # data and bitmap in two files: syncing one does not sync the other
        words = [image("bitmap.img", MiB), image("data.img", 64 * MiB), "0"]
    data = words[1] if form == "three-word" else words[0]
    if unwritten_pages(data) is None:
        pytest.skip("the kernel has no cachestat(2): cannot tell what reached the disk")
    checked = set()
    for delay in (0, 0.001, 0.002, 0.005, 0.011, 0.017):  # the kill lands at a different point of the loop each time
        flushed = kill_writer_midway(words, delay)
        layer_cli("check", words[0])
        layer = open_layer(words, writable=False)
        try:
            g = layer.grain
            bits = [i for a, b in layer.allocated_runs() for i in range(a, b)]
            assert bits[:flushed] == list(range(flushed))  # every grain of a completed sync has its bit
            for i in set(bits) - checked:  # a set bit, even one only in the page cache, has its data on the disk
                assert unwritten_pages(data, layer.data_offset + i * g, g) == 0, f"grain {i}: its bit before its data"
                assert os.pread(layer.data_fd, 8, layer.data_offset + i * g) == i.to_bytes(8, "little")
            checked.update(bits)
        finally:
            layer.close()


# the bitmap against a plain model


class BitmapModel(RuleBasedStateMachine):
    """Random marks, syncs and reopens of a real layer file against sets of grains: what is in
    memory after marks, and what a reopen finds (only what the last sync wrote)."""

    GRAINS = 2 * 16384 + 1000  # three bitmap pages; 512-byte grains, so the file stays small

    @initialize()
    def create(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "w.layer")
        offline.create(self.path, self.GRAINS * 512, 512)
        self.layer = open_layer([self.path], writable=True)
        self.alloc, self.zero = set(), set()
        self.synced = (set(), set())

    def teardown(self):
        if hasattr(self, "layer"):
            self.layer.close()
            shutil.rmtree(self.dir)

    spans = st.tuples(st.integers(0, GRAINS), st.one_of(st.integers(0, 40), st.integers(0, 20000)))

    @rule(span=spans, zero=st.booleans())
    def mark(self, span, zero):
        g0, g1 = span[0], min(self.GRAINS, span[0] + span[1])
        (self.layer.mark_zero if zero else self.layer.mark_allocated)(g0, g1)
        self.alloc |= set(range(g0, g1))
        self.zero = self.zero | set(range(g0, g1)) if zero else self.zero - set(range(g0, g1))

    @rule()
    def sync(self):
        self.layer.sync_bitmap()
        self.synced = (set(self.alloc), set(self.zero))

    @rule()
    def reopen(self):
        self.layer.close()
        self.layer = open_layer([self.path], writable=True)
        self.alloc, self.zero = set(self.synced[0]), set(self.synced[1])
        assert offline.check(self.path) == []

    @invariant()
    def bits_match_the_model(self):
        if not hasattr(self, "layer"):
            return
        assert self.layer.allocated_runs() == runs_of(self.alloc)
        assert self.layer.zero_runs() == runs_of(self.zero)
        assert self.layer.allocated_runs(100, 16390) == runs_of(g for g in self.alloc if 100 <= g < 16390)
        for g in (0, 7, 8, 16383, 16384, self.GRAINS - 1):
            assert (self.layer.is_allocated(g), self.layer.is_zero(g)) == (g in self.alloc, g in self.zero)


def runs_of(grains):
    out = []
    for g in sorted(grains):
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out


BitmapModel.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_the_bitmap_follows_a_plain_model_through_marks_syncs_and_reopens = BitmapModel.TestCase
