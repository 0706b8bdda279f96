"""The cow target against a plain Python model (hypothesis): random writes (partial grains
too), WRITE_ZEROES, TRIM, pushes and merges through a real daemon and nbdsh; the device must
read as the model says, and every layer file of the live table must pass `layer check`."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import count

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import REPO, device, need, nbdsh_env, run

KiB = 1 << 10
SIZE = 256 * KiB
GRAIN = 4 * KiB

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 3 * GRAIN)
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(1, 255)),
    st.tuples(st.just("zero"), offsets, lengths),
    st.tuples(st.just("trim"), offsets, lengths),
    st.tuples(st.just("push")),
    st.tuples(st.just("merge"), st.integers(0, 99), st.integers(0, 99)),
), min_size=1, max_size=25)

# runs in nbdsh (python3 with libnbd): the ops in order; push and merge through the CLI
SCRIPT = """
import json, subprocess, time
ops, cli = json.loads(OPS), json.loads(CLI)
n, pushed = 1, 0  # layers in the stack; layers pushed (each a new file)
def message(*words):
    r = subprocess.run(cli + ["message", "d", "0", *words], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
for op in ops:
    if op[0] == "write":
        h.pwrite(bytes([op[3]]) * op[2], op[1])
    elif op[0] == "zero":
        h.zero(op[2], op[1])
    elif op[0] == "trim":
        h.trim(op[2], op[1])
    elif op[0] == "push":
        n, pushed = n + 1, pushed + 1
        message("push", LAYERS + "/push%d.layer" % pushed)
    elif op[0] == "merge" and n >= 3:
        first = 2 + op[1] % (n - 2)
        last = first + op[2] % (n - first)
        message("merge", str(first), str(last))
        while json.loads(subprocess.run(cli + ["status", "--json", "d"], capture_output=True, check=True,
                                        text=True).stdout)["devices"][0]["segments"][0]["status"]["merge"] == "running":
            time.sleep(0.02)
        n -= last - first + 1
h.flush()
open(OUT, "wb").write(h.pread(SIZE, 0))
"""

_examples = count()


def model(base, program):
    img = bytearray(base)
    for op in program:
        if op[0] == "write":
            _, off, n, byte = op
            n = min(n, SIZE - off)
            img[off:off + n] = bytes([byte]) * n
        elif op[0] in ("zero", "trim"):
            _, off, n = op
            n = min(n, SIZE - off)
            img[off:off + n] = bytes(n)
    return bytes(img)


# each example starts a daemon: a few examples, and no shrinking (the failure prints the program)
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=ops)
def test_the_stack_reads_as_the_model_says_and_every_layer_checks(make_daemon, tmp_path, program):
    need("nbdsh")
    program = [op if op[0] not in ("write", "zero", "trim") else (op[0], op[1], min(op[2], SIZE - op[1]), *op[3:])
               for op in program]
    ex = tmp_path / f"ex{next(_examples)}"
    ex.mkdir()
    base = bytes((i * 7) & 0xFF for i in range(64 * KiB)) + bytes(SIZE - 64 * KiB)
    (ex / "base.img").write_bytes(base)
    l1 = ex / "l1.layer"
    run(sys.executable, "-m", "appliance", "layer", "create", str(l1), "--size", str(SIZE), cwd=REPO)
    d = make_daemon(device("d", f"0 {SIZE // 512} cow {ex / 'base.img'} 0 {l1}"), name=ex.name)
    cli = [sys.executable, "-m", "appliance", "--config", str(d.config)]
    out = ex / "out.img"
    script = (SCRIPT.replace("OPS", repr(json.dumps(program))).replace("CLI", repr(json.dumps(cli)))
              .replace("LAYERS", repr(str(ex))).replace("OUT", repr(str(out))).replace("SIZE", str(SIZE)))
    r = subprocess.run(["nbdsh", "-u", d.uri("d"), "-c", script], capture_output=True, text=True,
                       env=nbdsh_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, f"{program}: {r.stderr}"
    got, want = out.read_bytes(), model(base, program)
    if got != want:
        first = next(i for i in range(SIZE) if got[i] != want[i])
        raise AssertionError(f"{program}: byte {first}: read {got[first]}, the model says {want[first]}")
    table = d.cli("table", "d").stdout.split()
    d.stop()
    for layer in table[5:]:
        run(sys.executable, "-m", "appliance", "layer", "check", layer, cwd=REPO)
