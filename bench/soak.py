#!/usr/bin/env python3
"""Soak: many clients against several exports for a given time, while the daemon reloads.

    python bench/soak.py [--minutes M] [--churn N] [--reload-every S] [--sample-every S]

One daemon, three exports over files, a TCP listener with tls = "on" and its unix socket:
  - verifying clients (one per export, in clear and over TLS) write a pattern and read it
    back, over and over: any error or wrong byte fails the run;
  - `--churn` threads connect, send request streams (valid, odd and broken), hang up in the
    middle of requests or send garbage (tests/fuzz/nbd_fuzz.py's TransmissionFuzzer), in
    clear and over TLS;
  - a SIGHUP (reload) every `--reload-every` seconds.
Every `--sample-every` seconds the daemon's resident memory, descriptors and threads are
sampled; the report gives the curve's start and end. After the first quarter of the run
(the warm-up) and at its end, every client leaves and the daemon settles (it lists no
client). The verdict:
  - descriptors and threads: at the end, once the clients are gone, the daemon has what it
    had idle before the run (a connection that never ends leaves its socket, eventfd,
    io_uring and two threads);
  - memory: what the daemon keeps once the clients are gone is no more at the end than after
    the warm-up (the curve itself swings with the buffers of the requests in flight, up to
    64 MiB each; and idle before the run is no measure either: the allocator keeps freed heap);
  - no client saw an error, a wrong byte or a badly framed reply, and the daemon logged no
    traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import certs  # noqa: E402
from conftest import Daemon, config_text, device  # noqa: E402
from fuzz.nbd_fuzz import Canary, TransmissionFuzzer  # noqa: E402
from nut import free_port  # noqa: E402

EXPORTS = ("a", "b", "c")
SIZE = 64 << 20


# what the daemon may hold once all clients are gone beyond what it held idle before: less
# than one connection that never ended (3 descriptors, 2 threads)
SLACK = {"fds": 1, "threads": 1}
SETTLE = 30  # seconds the daemon has to end its connections once the clients are gone
RSS_SLACK = 16  # MiB (and 10%) more than after the warm-up, once the clients are gone


def sample(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    return {"rss_mib": int(field["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(field["Threads"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--churn", type=int, default=4, help="threads of churning clients (default 4)")
    p.add_argument("--reload-every", type=float, default=15, help="seconds between reloads (default 15)")
    p.add_argument("--sample-every", type=float, default=10, help="seconds between samples (default 10)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    ca = certs.make_ca(work / "ca")
    server, client = certs.server_dir(ca, work / "server"), certs.client_dir(ca, work / "client")
    cctx = ssl.create_default_context(cafile=str(client / "ca-cert.pem"))
    cctx.load_cert_chain(str(client / "client-cert.pem"), str(client / "client-key.pem"))
    devices = ""
    for name in EXPORTS:
        with open(work / f"{name}.img", "wb") as f:
            f.truncate(SIZE)
        devices += device(name, f"0 {SIZE // 512} linear {work}/{name}.img 0")
    # each export has a verifying client on a region the churn does not write: a device of its own
    for name in EXPORTS:
        with open(work / f"v{name}.img", "wb") as f:
            f.truncate(SIZE)
        devices += device(f"v{name}", f"0 {SIZE // 512} linear {work}/v{name}.img 0")
    port = free_port()
    d = Daemon(work, config_text(work, devices, extra=f'tls = "on"\ntls_certificates = "{server}"\n', tcp=port))
    d.start()
    tcp = ("127.0.0.1", port)
    fuzzers = [TransmissionFuzzer(d.socket if i % 2 == 0 else tcp, EXPORTS[i % len(EXPORTS)], SIZE,
                                  tls=cctx if i % 4 == 1 else None, seed=i) for i in range(args.churn)]
    samples, failures, verified = [], [], []
    t0 = time.monotonic()
    next_reload = t0 + args.reload_every
    reloads = 0

    def verifiers():
        return [Canary(d.socket, "va", SIZE), Canary(tcp, "vb", SIZE, tls=cctx), Canary(tcp, "vc", SIZE)]

    def clients():
        return sum(dev["clients"] for dev in d.status()["devices"])

    def settle(baseline=None):
        """Wait until the daemon lists no client and its descriptors and threads are back to
        `baseline` (none given: hold still over two samples), at most SETTLE seconds. -> the
        daemon's sample then, and how many clients it still lists."""
        deadline = time.monotonic() + SETTLE
        before = None
        while True:
            n = clients()  # first: status starts the slow path's I/O engine, once
            s = sample(d.proc.pid)
            if baseline is None:
                back = before is not None and all(s[k] == before[k] for k in SLACK)
            else:
                back = all(s[k] <= baseline[k] + SLACK[k] for k in SLACK)
            if (back and n == 0) or time.monotonic() > deadline:
                return s, n
            before = s
            time.sleep(0.5)

    def phase(seconds, baseline):
        """Verifying and churning clients for `seconds`, sampled, with reloads; then they all
        leave. -> the daemon settled (settle())."""
        nonlocal next_reload, reloads
        canaries = verifiers()
        stop = threading.Event()

        def churn(f, i):
            try:
                while not stop.is_set():
                    f.run(streams=1)
            except Exception as e:  # noqa: BLE001 (a bad reply, or the daemon stopped answering)
                failures.append(f"churn client {i}: {e!r}")

        threads = [threading.Thread(target=churn, args=(f, i), daemon=True) for i, f in enumerate(fuzzers)]
        for c in canaries + threads:
            c.start()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                time.sleep(min(args.sample_every, max(0, end - time.monotonic())))
                if d.proc.poll() is not None:
                    raise SystemExit(f"the daemon died:\n{d.log.read_text()[-3000:]}")
                if time.monotonic() >= next_reload:
                    d.signal(signal.SIGHUP)
                    reloads += 1
                    next_reload += args.reload_every
                s = sample(d.proc.pid)
                s["t"] = round(time.monotonic() - t0)
                s["streams"] = sum(f.streams for f in fuzzers)
                s["verified"] = sum(verified) + sum(c.rounds for c in canaries)
                samples.append(s)
                print(f"{s['t']:>5}s  rss {s['rss_mib']:7.1f} MiB  fds {s['fds']:4}  threads {s['threads']:4}  "
                      f"streams {s['streams']:6}  verified {s['verified']:7}", flush=True)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            failures.extend(f"churn client {i} is stuck" for i, t in enumerate(threads) if t.is_alive())
            for c in canaries:
                try:
                    c.stop()
                except AssertionError as e:
                    failures.append(str(e))
                verified.append(c.rounds)
        return settle(baseline)

    try:
        # idle: after a round of verified I/O on each export (clear and TLS), which starts what
        # the daemon starts once (OpenSSL's tables...)
        warm = verifiers()
        for c in warm:
            c.start()
        while any(c.rounds < 10 and c.is_alive() for c in warm):
            time.sleep(0.1)
        for c in warm:
            c.stop()
        idle, _ = settle()
        warmed, _ = phase(args.minutes * 60 / 4, idle)
        print(f"{round(time.monotonic() - t0):>5}s  warm-up over, all clients gone: rss {warmed['rss_mib']:.1f} MiB  "
              f"fds {warmed['fds']}  threads {warmed['threads']}", flush=True)
        gone, left = phase(args.minutes * 60 * 3 / 4, idle)
    finally:
        d.stop()
    if left:
        failures.append(f"{left} connection(s) still open {SETTLE}s after their clients left")
    if "Traceback" in d.log.read_text():
        failures.append(f"the daemon logged a traceback (log: {d.log})")

    print(f"{reloads} reloads, {samples[-1]['streams']} churn streams, {samples[-1]['verified']} verified rounds")
    grew = []
    for k in ("rss_mib", "fds", "threads"):
        print(f"{k:>8}: idle before {idle[k]:.1f}; curve start {samples[0][k]:.1f}, end {samples[-1][k]:.1f}; "
              f"all clients gone after warm-up {warmed[k]:.1f}, at the end {gone[k]:.1f}")
        if k == "rss_mib":
            if gone[k] > warmed[k] * 1.1 + RSS_SLACK:
                grew.append(f"{k} (all clients gone: {gone[k]:.1f} at the end > {warmed[k]:.1f} after warm-up)")
        elif gone[k] > idle[k] + SLACK[k]:
            grew.append(f"{k} (all clients gone: {gone[k]:.0f} at the end > {idle[k]:.0f} idle before)")
    if grew:
        failures.append("grew: " + ", ".join(grew))
    print("FAIL: " + "; ".join(failures) if failures else "PASS: memory, descriptors and threads flat")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
