#!/usr/bin/env python3
"""Issue 14's figures: NBD over TLS, against nbdkit --tls=require on the same file.

    python bench/tls.py [--runtime S] [--size MiB] [--seq-qd N]

One data file (random data, in the page cache), certificates made with openssl, then in turn
  (a) `appliance serve`, one `linear` device over the file, a TCP listener with
      tls = "on": fio connects with nbds:// (TLS) and, for the cost of TLS, nbd:// (clear);
  (b) `nbdkit --tls=require --tls-certificates=DIR file FILE` on TCP, with nbds://.
fio's nbd engine (libnbd, GnuTLS) runs 4 KiB random read at QD16 and 1 MiB sequential read;
it finds the client certificates where libnbd looks by default ($HOME/.pki/libnbd, HOME set
to the temp dir), as fio does not let a URI name a local directory.
The table gives each figure, the server's CPU time per request (less sensitive to other load
than IOPS), and the appliance's TLS figure as a ratio of nbdkit's (the bar: >= 1.0x) and of
its own in clear.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import certs  # noqa: E402 (tests/certs.py: the test suite's openssl certificates)
from common import (  # noqa: E402
    MiB,
    Appliance,
    BenchError,
    Nbdkit,
    Workload,
    environment,
    fmt_num,
    fmt_ratio,
    make_data_file,
    measure,
    need_tools,
    print_table,
    ratio,
    terminate_on_signals,
    workdir,
    write_results,
)

DEVICE = "bench"
BAR = 1.0  # the issue: at least nbdkit's figure over TLS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class TlsAppliance(Appliance):
    """The appliance with a TCP listener that serves TLS and clear (tls = "on")."""

    def __init__(self, workdir, devices, port, server_certs, tls=True):
        super().__init__(workdir, devices, extra_config=f'tcp = "127.0.0.1:{port}"\ntls = "on"\n'
                         f'tls_certificates = "{server_certs}"\n')
        self.port, self.tls = port, tls

    def uri(self, export=None):
        export = self.default_export if export is None else export
        return f"{'nbds' if self.tls else 'nbd'}://127.0.0.1:{self.port}/{export}"


class TlsNbdkit(Nbdkit):
    def __init__(self, workdir, data, port, server_certs):
        super().__init__(workdir, "file", [f"file={data}"])
        self.port, self.server_certs = port, server_certs

    def command(self):
        return ["nbdkit", "--port", str(self.port), "-i", "127.0.0.1", "--foreground", "--exit-with-parent",
                "--tls=require", f"--tls-certificates={self.server_certs}", "file", *self.args]

    def _ready(self, timeout):
        wait_for_port(self.port, self.proc, timeout)

    def uri(self, export=None):
        return f"nbds://127.0.0.1:{self.port}/"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--ramp", type=float, default=1, help="seconds of fio ramp (default 1)")
    p.add_argument("--size", type=int, default=512, help="data file size in MiB (default 512)")
    p.add_argument("--seq-qd", type=int, default=4, help="queue depth of the 1 MiB reads (default 4)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/tls-*.json")
    args = p.parse_args(argv)
    need_tools("fio", "nbdkit", "openssl")
    terminate_on_signals()
    wls = [Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16),
           Workload(f"read-1m-qd{args.seq_qd}", f"1 MiB sequential read, QD{args.seq_qd}", "read", "1m",
                    args.seq_qd, metric="mib_s")]
    size = args.size * MiB
    results = {}
    with workdir(keep=args.keep) as wd:
        ca = certs.make_ca(wd / "ca")
        server_certs, client_certs = certs.server_dir(ca, wd / "server"), certs.client_dir(ca, wd / "client")
        shutil.copytree(client_certs, wd / "home" / ".pki" / "libnbd")
        os.environ["HOME"] = str(wd / "home")  # fio's libnbd finds the client certificates there
        data = str(wd / "tls-bench.img")
        log(f"writing {args.size} MiB of random data to {data} ...")
        make_data_file(data, size)
        port = free_port()
        app = TlsAppliance(wd, [(DEVICE, [f"0 {size // 512} linear {data} 0"])], port, server_certs)
        kit = TlsNbdkit(wd, data, free_port(), server_certs)
        for label, srv, modes in (("appliance", app, (True, False)), ("nbdkit", kit, (True,))):
            log(f"starting {label}: {' '.join(srv.command())}")
            with srv:
                for tls in modes:
                    if label == "appliance":
                        srv.tls = tls
                    name = f"{label} {'TLS' if tls else 'clear'}"
                    for wl in wls:
                        r = measure(srv, wl, runtime=args.runtime, ramp_time=args.ramp)
                        results.setdefault(name, {})[wl.key] = r
                        log(f"  {name:<16} {wl.title:<32} {fmt_num(wl.value(r), wl.metric):>7} {wl.unit:<5}"
                            f"  server CPU {r.server_cpu:.0f}% ({r.server_us_per_io:.1f} us/IO)"
                            f"  p99 {r.lat_p99_us:.0f} us")

    rows = []
    for wl in wls:
        a, c, n = (results[k][wl.key] for k in ("appliance TLS", "appliance clear", "nbdkit TLS"))
        vs_kit = ratio(wl.value(a), wl.value(n))
        rows.append([wl.title, wl.unit, fmt_num(wl.value(a), wl.metric), fmt_num(wl.value(n), wl.metric),
                     fmt_num(wl.value(c), wl.metric), fmt_ratio(vs_kit), fmt_ratio(ratio(wl.value(a), wl.value(c))),
                     f"{a.server_us_per_io:.1f}", f"{n.server_us_per_io:.1f}", f"{c.server_us_per_io:.1f}",
                     "PASS" if vs_kit is not None and vs_kit >= BAR else "FAIL"])
    print_table(["workload", "unit", "appl. TLS", "nbdkit TLS", "appl. clear", "vs nbdkit", "vs clear",
                 "us/IO TLS", "us/IO nbdkit", "us/IO clear", f">={BAR:.1f}x nbdkit"], rows)
    if not args.no_save:
        path = write_results("tls", {"environment": environment(), "args": vars(args),
                                     "results": {k: {w: r.to_dict() for w, r in v.items()} for k, v in results.items()}})
        log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
