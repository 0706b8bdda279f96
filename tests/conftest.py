"""Shared fixtures: a real daemon in a subprocess, real NBD clients against it."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def need(*tools):
    """Skip unless every tool is installed (the README's test command installs them all)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


class Daemon:
    """`appliance serve` on a config of its own, in a temporary directory."""

    def __init__(self, workdir: Path, config_text: str, name="appliance"):
        self.dir = workdir
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config_text)
        self.control = str(workdir / f"{name}-control.sock")
        self.socket = str(workdir / f"{name}-nbd.sock")
        self.log = workdir / f"{name}.log"
        self.proc = None

    def start(self, timeout=20, expect_ready=True):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(self.config), "serve"],
            cwd=REPO,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if not expect_ready:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            if "connect with:" in self.log.read_text():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log.read_text()}")

    def restart(self):
        """Start it again (after kill or stop); the log of the run before goes to .log.1
        (start() waits for a line the old log already has)."""
        os.replace(self.log, str(self.log) + ".1")
        return self.start()

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.socket}"

    def cli(self, *args, check=True, timeout=60):
        r = subprocess.run(
            [sys.executable, "-m", "appliance", "--config", str(self.config), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def status(self, name=None):
        args = ["status", "--json"] + ([name] if name else [])
        return json.loads(self.cli(*args).stdout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def config_text(tmp: Path, devices: str, name="appliance", extra="", tcp=None) -> str:
    """A config whose sockets live in `tmp`; `devices` is the [[device]] part."""
    listen = f'unix = "{tmp}/{name}-nbd.sock"\n' + (f'tcp = "127.0.0.1:{tcp}"\n' if tcp else "")
    return (
        f'[daemon]\ncontrol = "{tmp}/{name}-control.sock"\nstate_dir = "{tmp}/state"\n\n'
        f"[export]\n{listen}\n{extra}\n{devices}"
    )


@pytest.fixture
def make_daemon(tmp_path):
    """make_daemon(devices_toml, **kw) -> a started Daemon; stopped at the end of the test."""
    started = []

    def make(devices, *, name="appliance", extra="", tcp=None, start=True):
        d = Daemon(tmp_path, config_text(tmp_path, devices, name, extra, tcp), name)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
        if d.proc and d.proc.returncode not in (0, None, -9):
            print(d.log.read_text())
        _remove_ram_stores(d.control)


def _remove_ram_stores(control):
    """ramback keeps its RAM store in /dev/shm after a clean stop (a restart reattaches it);
    a test's stores go with the test, or /dev/shm fills up over a run."""
    try:
        from appliance.targets.ramback.store import default_dir
    except ImportError:
        return
    shutil.rmtree(default_dir(control), ignore_errors=True)


@pytest.fixture
def image(tmp_path):
    """image(name, size) -> path of a sparse file."""

    def make(name="disk.img", size=64 << 20):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(size)
        return str(p)

    return make


def device(name, *lines, **opts):
    """One [[device]] table of a config: `device("d", "0 8 zero", read_only=True)`."""
    text = f'[[device]]\nname = "{name}"\ntable = {json.dumps(list(lines))}\n'
    for key, value in opts.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text + "\n"


def wait_for(predicate, timeout=10.0, what=None, step=0.05):
    """Poll `predicate` until it returns something true, and return that; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or predicate.__doc__ or predicate}")
        time.sleep(step)


LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


def need_loop():
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and /dev/loop-control")
    need("losetup", "qemu-io")


class Loop:
    """A loop device number of our own, made and unmade through /dev/loop-control."""

    def __init__(self):
        for _ in range(50):
            n = random.randint(64, 250)
            if not os.path.exists(f"/dev/loop{n}"):
                break
        self.n = n
        self.path = f"/dev/loop{n}"

    def add(self, backing):
        fd = os.open("/dev/loop-control", os.O_RDWR)
        try:
            fcntl.ioctl(fd, LOOP_CTL_ADD, self.n)
        finally:
            os.close(fd)
        deadline = time.monotonic() + 5
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.02)
        run("losetup", self.path, str(backing))

    def remove(self):
        run("losetup", "-d", self.path, check=False)
        fd = os.open("/dev/loop-control", os.O_RDWR)
        try:
            for _ in range(50):
                try:
                    fcntl.ioctl(fd, LOOP_CTL_REMOVE, self.n)
                    return
                except OSError:
                    time.sleep(0.1)  # autoclear still running, or not yet released
        finally:
            os.close(fd)


@pytest.fixture
def loop():
    need_loop()
    lo = Loop()
    yield lo
    if os.path.exists(lo.path):
        lo.remove()


def nbd_python():
    """A python3 with libnbd's bindings (the `nbd` module). Debian's python3-libnbd is for
    /usr/bin/python3, not for a pyenv python3 that may come first on PATH."""
    for py in (shutil.which("python3"), "/usr/bin/python3"):
        if py and subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return py
    pytest.skip("python3-libnbd (nbdsh's module) is not importable")


def nbdsh_env():
    """nbdsh runs `python3 -m nbd`: put a python3 with the bindings first on PATH."""
    return dict(os.environ, PATH=os.path.dirname(nbd_python()) + os.pathsep + os.environ["PATH"])


def cpu_seconds(pid):
    """CPU time a process has used so far (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(*cmd, check=True, timeout=120, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def replay_log(log, out, *flags, size=None):
    """`appliance log-writes replay LOG OUT FLAGS...` onto a fresh file of `size` bytes; its bytes.
    How tests see what reached the disk: the log below a device, replayed to a flush."""
    out = Path(out)
    with open(out, "wb") as f:
        f.truncate(size or 0)
    run(sys.executable, "-m", "appliance", "log-writes", "replay", str(log), str(out), *flags, cwd=REPO)
    return out.read_bytes()


def unwritten_pages(path, offset=0, length=0):
    """Pages of `path` in [offset, offset+length) (0: to the end) that the page cache holds dirty
    or under writeback: not yet on the disk. Linux's cachestat(2) (6.5+); None where the kernel
    cannot tell. What log-writes cannot see: whether the file below it was really synced."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = Stat()
        if libc.syscall(451, fd, ctypes.byref(Range(offset, length)), ctypes.byref(st), 0) != 0:  # cachestat
            return None
        return st.dirty + st.writeback
    finally:
        os.close(fd)


# ---- remote peers: nbdkit servers, and qemu-io against a URI

@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit(*args, sock=None, port=None) -> a running `nbdkit --unix SOCK ARGS...` (or on
    127.0.0.1:PORT); `.sock` is its socket.
    Ready once its pid file exists (nbdkit writes it when the socket accepts)."""
    procs = []

    def start(*args, sock=None, port=None):
        need("nbdkit")
        sock = sock or str(tmp_path / f"kit{len(procs)}.sock")
        pidfile = tmp_path / f"kit{len(procs)}.pid"
        for stale in (sock, pidfile):  # a SIGKILLed nbdkit leaves both
            if os.path.exists(stale):
                os.unlink(stale)
        listen = ["-i", "127.0.0.1", "-p", str(port)] if port else ["--unix", sock]
        p = subprocess.Popen(["nbdkit", *listen, "-P", str(pidfile), "--foreground",
                              "--exit-with-parent", *args], stderr=subprocess.PIPE)
        procs.append(p)
        wait_for(lambda: pidfile.exists() or p.poll() is not None, 10, "nbdkit to listen")
        if p.poll() is not None:
            raise AssertionError(f"nbdkit {' '.join(args)} exited: {p.stderr.read().decode()}")
        p.sock = sock
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def remote(sock, **params):
    query = "".join(f"&{k}={v}" for k, v in params.items())
    return f"nbd+unix:///?socket={sock}{query}"


def qemu_io(uri, *commands, check=True, timeout=60):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(*args, uri, check=check, timeout=timeout)


# ---- etcd, for clustered logs

def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """Real etcd members on 127.0.0.1 (free ports, a data dir each), one cluster. `.urls` are
    their client URLs (`.url` the first); `.stop(i)`/`.start(i)` take member i away (SIGKILL)
    and bring it back on the same ports and data. `tls`: a directory with ca-cert.pem and
    server-cert.pem/server-key.pem (tests/certs.py's layout): clients then need https and a
    client certificate signed by that CA."""

    def __init__(self, tmp_path, members=1, tls=None):
        need("etcd")
        self.dir, self.tls = tmp_path, tls
        self.names = [f"m{i}" for i in range(members)]
        self.clients = [free_port() for _ in self.names]
        self.peers = [f"http://127.0.0.1:{free_port()}" for _ in self.names]
        scheme = "https" if tls else "http"
        self.urls = [f"{scheme}://127.0.0.1:{p}" for p in self.clients]
        self.url = self.urls[0]
        self.procs = [None] * members
        self.initial = ",".join(f"{n}={p}" for n, p in zip(self.names, self.peers))

    def start(self, i=0, wait=True):
        args = ["etcd", "--name", self.names[i], "--data-dir", str(self.dir / f"etcd-{self.names[i]}"),
                "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
                "--listen-peer-urls", self.peers[i], "--initial-advertise-peer-urls", self.peers[i],
                "--initial-cluster", self.initial]
        if self.tls:
            args += ["--cert-file", str(self.tls / "server-cert.pem"), "--key-file",
                     str(self.tls / "server-key.pem"), "--trusted-ca-file",
                     str(self.tls / "ca-cert.pem"), "--client-cert-auth"]
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                         stderr=open(self.dir / f"etcd-{self.names[i]}.log", "ab"))
        if wait:
            self.wait_healthy(i)

    def wait_healthy(self, i=0):
        # /health needs a quorum: with members starting one by one, wait for the port instead
        import socket

        def up():
            if self.procs[i].poll() is not None:
                return True
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.clients[i])) == 0
        wait_for(up, 20, f"etcd {self.names[i]} to listen")
        assert self.procs[i].poll() is None, (self.dir / f"etcd-{self.names[i]}.log").read_text()[-2000:]

    def start_all(self):
        for i in range(len(self.names)):
            self.start(i, wait=False)
        for i in range(len(self.names)):
            self.wait_healthy(i)
        from appliance.cluster.etcd import Etcd

        client = Etcd(self.urls, timeout=20, **self.client_tls())
        client.get_prefix("/")  # a quorum answers (a linearizable read)

    def client_tls(self):
        """The keyword arguments an appliance.cluster.etcd.Etcd needs to reach these members."""
        if not self.tls:
            return {}
        return {"ca": str(self.tls / "ca-cert.pem"), "cert": str(self.tls / "client-cert.pem"),
                "key": str(self.tls / "client-key.pem")}

    def stop(self, i=0):
        if self.procs[i] is not None and self.procs[i].poll() is None:
            self.procs[i].kill()
        if self.procs[i] is not None:
            self.procs[i].wait()


@pytest.fixture
def etcd(tmp_path):
    """A real single-member etcd (EtcdCluster with one member)."""
    e = EtcdCluster(tmp_path)
    e.start_all()
    yield e
    e.stop()


@pytest.fixture
def etcd3(tmp_path):
    """Three etcd members, one cluster: one may go, two going lose the quorum."""
    e = EtcdCluster(tmp_path, members=3)
    e.start_all()
    yield e
    for i in range(3):
        e.stop(i)
