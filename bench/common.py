"""Reusable pieces for the benchmarks in bench/.

Every benchmark here measures the appliance against its peers (nbdkit,
qemu-nbd) in the same invocation, on the same machine and the same data,
and reports ratios rather than absolute numbers: absolute figures on a
shared 2-core box mean little, ratios taken minutes apart mean more.

The pieces:

- `need_tools(...)`: fail early, with one clear message, if a tool is missing.
- `make_data_file(path, size)`: a file of real (random) data, flushed and read
  once so it sits in the page cache.
- Servers, each a context manager that kills what it started, on its own
  Unix socket: `Appliance(workdir, devices)`, `Nbdkit(workdir, plugin, args)`,
  `QemuNbd(workdir, image)`. `.uri(export)` gives the NBD URI, `.cpu_seconds()`
  the server's CPU time so far.
- `run_fio(uri, rw=..., bs=..., iodepth=...)` -> `FioResult` (IOPS, bandwidth,
  latency percentiles, fio's own CPU).
- `Workload`, `measure(server, workload, ...)`: one fio run plus the server's
  CPU use during it.
- `print_table(headers, rows)`, `fmt_ratio(a, b)`, `write_results(name, data)`.

Nothing here is product code; it only drives the CLI and the peers.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

MiB = 1 << 20
GiB = 1 << 30


class BenchError(RuntimeError):
    """Something the benchmark cannot go on without; the message says what."""


# ---- tools ----------------------------------------------------------------

INSTALL_HINTS = {
    "fio": "apt-get install fio (the 'nbd' ioengine needs fio built with libnbd, as Debian's is)",
    "nbdkit": "apt-get install nbdkit",
    "qemu-nbd": "apt-get install qemu-utils",
}


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hints = "; ".join(f"{t}: {INSTALL_HINTS.get(t, 'install it')}" for t in missing)
        raise BenchError(f"missing tool(s): {', '.join(missing)} ({hints})")
    if "fio" in tools:
        r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
        if r.returncode != 0 or "uri" not in r.stdout:
            raise BenchError("this fio has no 'nbd' ioengine (fio must be built with libnbd)")


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else "?"


def environment() -> dict:
    """What a reader of a results file needs to judge the numbers."""
    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "fio": tool_version(["fio", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
    }


# ---- data -----------------------------------------------------------------

def make_data_file(path: str | os.PathLike, size: int, chunk: int = 4 * MiB) -> str:
    """Write `size` bytes of random data (no holes), fsync, then read it back
    once so every page is in the page cache. Returns the path as a string."""
    path = str(path)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    warm_file(path)
    return path


def warm_file(path: str, chunk: int = 8 * MiB) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def settle(pause: float = 0.5) -> None:
    """Flush dirty pages left by the previous run so their writeback does not
    land in the next measurement, then let the machine go quiet briefly."""
    os.sync()
    time.sleep(pause)


# ---- processes ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # If the benchmark itself is SIGKILLed, its servers must not linger.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float, log=None) -> None:
    """Until `path` accepts a connection; fails early if `proc` exits. log: a callable
    returning the server's output, shown in the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode} before listening"
                             + (f":\n{log()}" if log else ""))
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise BenchError(f"{proc.args[0]} did not listen on {path} within {timeout}s"
                     + (f":\n{log()}" if log else ""))


class Server:
    """A server process on a Unix socket of its own. Use as a context manager,
    or call start()/stop() (stop() is idempotent and always reaps the process)."""

    label = "server"
    default_export = ""

    def __init__(self, workdir: str | os.PathLike, name: str):
        self.dir = Path(workdir)
        self.name = name
        self.socket = str(self.dir / f"{name}.sock")
        self.log = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._logf = None
        self._log_start = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> str | None:
        return None

    def env(self) -> dict:
        return dict(os.environ)

    def _ready(self, timeout: float) -> None:
        wait_for_socket(self.socket, self.proc, timeout, self.log_text)

    def start(self, timeout: float = 30) -> "Server":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # nbdkit refuses a stale socket
        self._logf = open(self.log, "ab")
        self._log_start = self._logf.tell()  # the log is appended to across restarts
        self.proc = subprocess.Popen(
            self.command(), cwd=self.cwd(), env=self.env(), stdin=subprocess.DEVNULL,
            stdout=self._logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        try:
            self._ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        return self.proc.returncode if self.proc else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid)

    def uri(self, export: str | None = None) -> str:
        return f"nbd+unix:///{self.default_export if export is None else export}?socket={self.socket}"

    def log_text(self) -> str:
        """What this run of the server logged (not earlier runs on the same log file)."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")


class Appliance(Server):
    """`python -m appliance --config X serve` from the repo, on a config of its own.

    devices: [(name, [table lines])] or [(name, [table lines], {extra keys})].
    The first device is the default export."""

    label = "appliance"

    def __init__(self, workdir, devices, name: str = "appliance", extra_config: str = "",
                 log_level: str = "warning"):
        super().__init__(workdir, name)
        self.devices = devices
        self.control = str(self.dir / f"{name}-control.sock")
        self.config = self.dir / f"{name}.toml"
        self.default_export = devices[0][0]
        parts = [
            f'[daemon]\ncontrol = "{self.control}"\nstate_dir = "{self.dir / (name + "-state")}"\n'
            f'log_level = "{log_level}"\n',
            f'[export]\nunix = "{self.socket}"\n',
            extra_config,
        ]
        for dev in devices:
            dname, lines = dev[0], dev[1]
            keys = dev[2] if len(dev) > 2 else {}
            quoted = ", ".join(json.dumps(line) for line in lines)
            extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            parts.append(f'[[device]]\nname = "{dname}"\ntable = [{quoted}]\n{extra}')
        self.config.write_text("\n".join(parts))

    def command(self):
        return [sys.executable, "-m", "appliance", "--config", str(self.config), "serve"]

    def cwd(self):
        return str(REPO)

    def env(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self, timeout: float = 30):
        if not list((REPO / "appliance" / "_fast").glob("transmit*.so")):
            raise BenchError("appliance's compiled modules are not built; run "
                             "`python setup.py build_ext --inplace` in the repo first")
        return super().start(timeout)

    def _ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"appliance exited with {self.proc.returncode} before it was ready:\n"
                                 f"{self.log_text()}")
            if "connect with:" in self.log_text():
                return
            time.sleep(0.05)
        raise BenchError(f"appliance not ready within {timeout}s:\n{self.log_text()}")

    def cli(self, *args, timeout: float = 60) -> str:
        r = subprocess.run([sys.executable, "-m", "appliance", "--config", str(self.config), *args],
                           cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"appliance {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def status(self, name: str | None = None) -> dict:
        return json.loads(self.cli("status", "--json", *([name] if name else [])))

    def fast_ios(self, name: str | None = None) -> int:
        name = name or self.default_export
        for d in self.status()["devices"]:
            if d["name"] == name:
                return d.get("fast_ios", 0)
        raise BenchError(f"no device {name!r} in appliance status")


class Nbdkit(Server):
    """`nbdkit --unix SOCK --foreground [--filter=F...] PLUGIN ARGS...` with nbdkit's
    default thread count unless `threads` is given."""

    label = "nbdkit"

    def __init__(self, workdir, plugin: str, args=(), name: str = "nbdkit", filters=(),
                 threads: int | None = None, extra=()):
        super().__init__(workdir, name)
        self.plugin, self.args, self.filters = plugin, list(args), list(filters)
        self.threads, self.extra = threads, list(extra)

    def command(self):
        cmd = ["nbdkit", "--unix", self.socket, "--foreground", "--exit-with-parent"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        cmd += [f"--filter={f}" for f in self.filters] + self.extra
        return cmd + [self.plugin, *self.args]


class QemuNbd(Server):
    """`qemu-nbd --socket SOCK --persistent --shared=N --cache=MODE -f FMT IMAGE`.
    --shared lets several clients connect at once (the default is 1);
    --persistent keeps it up between clients."""

    label = "qemu-nbd"

    def __init__(self, workdir, image: str, name: str = "qemu-nbd", fmt: str = "raw", shared: int = 16,
                 cache: str = "writeback", aio: str | None = None, extra=()):
        super().__init__(workdir, name)
        self.image, self.fmt, self.shared, self.cache, self.aio = image, fmt, shared, cache, aio
        self.extra = list(extra)

    def command(self):
        cmd = ["qemu-nbd", "--socket", self.socket, "--format", self.fmt, "--persistent",
               f"--shared={self.shared}", f"--cache={self.cache}"]
        if self.aio:
            cmd.append(f"--aio={self.aio}")
        return cmd + self.extra + [self.image]


@contextlib.contextmanager
def workdir(keep: bool = False, prefix: str = "appliance-bench-", base: str | None = None):
    """A temporary directory (short path: Unix socket names are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix=prefix, dir=base or "/tmp")
    try:
        yield Path(d)
    finally:
        if keep:
            print(f"kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def terminate_on_signals():
    """Turn SIGTERM/SIGHUP into SystemExit so `finally` blocks stop the servers."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


# ---- fio ------------------------------------------------------------------

@dataclasses.dataclass
class FioResult:
    iops: float                # reads + writes, all jobs
    bw_bytes: float            # bytes/s, all jobs
    lat_mean_us: float         # completion latency as fio sees it (submit -> complete)
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    fio_cpu: float             # fio's CPU use, % of one CPU (usr + sys, summed over jobs)
    total_ios: int
    runtime_s: float
    command: list
    server_cpu: float | None = None   # the server's CPU use during the run, % of one CPU
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.bw_bytes / MiB

    @property
    def server_us_per_io(self) -> float | None:
        """Server CPU time per request, in microseconds: a figure much less
        sensitive to other load on the machine than IOPS. Slightly high,
        since the ramp's requests are not in total_ios but its CPU is."""
        if self.server_cpu is None or not self.iops:
            return None
        return self.server_cpu * 1e4 / self.iops

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mib_s"] = self.mib_s
        d["server_us_per_io"] = self.server_us_per_io
        return d


def parse_fio_json(text: str) -> dict:
    # fio's nbd engine prints "fio: connected to NBD server" on stdout before the JSON
    start = text.find("{\n")
    if start < 0:
        start = text.find("{")
    if start < 0:
        raise BenchError(f"no JSON in fio output:\n{text[-2000:]}")
    return json.loads(text[start:])


def run_fio(uri: str | None, *, rw: str, bs: str, iodepth: int, runtime: float, numjobs: int = 1,
            ramp_time: float = 0, name: str = "bench", extra=(), timeout: float | None = None,
            filename: str | None = None) -> FioResult:
    """One fio run with the nbd ioengine against `uri`, or, with `filename` instead, with
    io_uring and O_DIRECT on that file (the physical limit the servers are measured
    against). `numjobs` > 1 opens that many connections (one per job); the figures are
    summed over jobs (group_reporting)."""
    target = ([f"--filename={filename}", "--ioengine=io_uring", "--direct=1"] if filename
              else ["--ioengine=nbd", f"--uri={uri}"])
    cmd = [
        "fio", f"--name={name}", *target, f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={iodepth}", f"--numjobs={numjobs}", "--group_reporting",
        "--time_based", f"--runtime={round(runtime * 1000)}ms", "--output-format=json",
        "--norandommap", "--randrepeat=0",
    ]
    if ramp_time:
        cmd.append(f"--ramp_time={round(ramp_time * 1000)}ms")  # plain numbers are whole seconds
    cmd += list(extra)
    if timeout is None:
        timeout = ramp_time + runtime + 60
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio did not finish within {timeout}s: {' '.join(cmd)}") from None
    if r.returncode != 0:
        raise BenchError(f"fio failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()}\n{r.stdout[-2000:]}")
    data = parse_fio_json(r.stdout)
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {' '.join(cmd)}\n{r.stderr.strip()}")
    iops = bw = 0.0
    total = 0
    lat = None
    for d in ("read", "write", "trim"):
        part = job.get(d) or {}
        if not part.get("total_ios"):
            continue
        iops += part["iops"]
        bw += part["bw_bytes"]
        total += part["total_ios"]
        if lat is None or part["total_ios"] > lat[0]:
            lat = (part["total_ios"], part["clat_ns"])
    if not total:
        raise BenchError(f"fio completed no I/O: {' '.join(cmd)}\n{r.stderr.strip()}")
    clat = lat[1]
    pct = clat.get("percentile", {})

    def p(key):
        return pct.get(key, float("nan")) / 1000

    return FioResult(
        iops=iops, bw_bytes=bw, lat_mean_us=clat["mean"] / 1000,
        lat_p50_us=p("50.000000"), lat_p99_us=p("99.000000"), lat_p999_us=p("99.900000"),
        fio_cpu=job["usr_cpu"] + job["sys_cpu"], total_ios=total,
        runtime_s=job.get("job_runtime", job.get("elapsed", 0) * 1000) / 1000, command=cmd,
    )


# ---- workloads ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    key: str                  # short id used in results files
    title: str                # what the table shows
    rw: str                   # fio --rw
    bs: str                   # fio --bs
    iodepth: int
    numjobs: int = 1
    metric: str = "iops"      # "iops" or "mib_s": the figure the table and ratios use

    def value(self, r: FioResult) -> float:
        return r.iops if self.metric == "iops" else r.mib_s

    @property
    def unit(self) -> str:
        return "IOPS" if self.metric == "iops" else "MiB/s"


def measure(server: Server, wl: Workload, *, runtime: float, ramp_time: float = 1,
            export: str | None = None, settle_first: bool = True, extra=()) -> FioResult:
    """Run one workload against a started server; adds the server's CPU use
    (% of one CPU over the fio run, ramp included) to the result."""
    if settle_first:
        settle()
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    res = run_fio(server.uri(export), rw=wl.rw, bs=wl.bs, iodepth=wl.iodepth, numjobs=wl.numjobs,
                  runtime=runtime, ramp_time=ramp_time, name=wl.key, extra=extra)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    res.server_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
    return res


def median_result(results: list[FioResult], wl: Workload) -> FioResult:
    """The run whose figure is the median (a real run, not a blend)."""
    ordered = sorted(results, key=wl.value)
    return ordered[(len(ordered) - 1) // 2]


# ---- reporting ------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_num(v: float | None, metric: str = "iops") -> str:
    if v is None:
        return "-"
    if metric == "iops":
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def print_table(headers: list[str], rows: list[list], file=None, align: str | None = None) -> None:
    """Plain-text table. align: one char per column, 'l' or 'r' (default: first left, rest right)."""
    file = file or sys.stdout
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    print(line(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells[1:]:
        print(line(r), file=file)


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS / f"{name}-{stamp}-{n}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
