"""A real NUT for the power tests: the `dummy-ups` driver and `upsd` on
127.0.0.1 on a free port, each a foreground child process, with a config
directory of their own (ups.conf, upsd.conf, upsd.users, the driver's .dev
file) and a state directory (NUT_CONFPATH, NUT_STATEPATH). Also `upsmon`,
for the push path, with its upsmon.conf in the same directory.

Change the UPS with `set()` (upsrw: upsd sees it at once) or `write_dev()`
(the driver re-reads its .dev file only when the mtime changes; this bumps
the mtime by a whole second each time, so no edit is ever missed).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NUT_BIN = Path("/lib/nut")
DRIVER = NUT_BIN / "dummy-ups"
UPSD = NUT_BIN / "upsd"
UPSMON = NUT_BIN / "upsmon" if (NUT_BIN / "upsmon").exists() else Path(shutil.which("upsmon") or "/usr/sbin/upsmon")
ADMIN, ADMIN_PW = "admin", "adminpw"  # may SET variables (upsrw)
MON, MON_PW = "monuser", "monpw"  # upsmon secondary: what the appliance logs in as

# upsmon events and the flags that make upsmon run NOTIFYCMD for them
NOTIFY_EVENTS = ("ONLINE", "ONBATT", "LOWBATT", "FSD", "COMMOK", "COMMBAD", "SHUTDOWN", "NOCOMM")


def need_nut():
    missing = [str(p) for p in (DRIVER, UPSD) if not p.exists()]
    missing += [t for t in ("upsc", "upsrw") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"NUT not installed (apt install nut-server nut-client): {', '.join(missing)}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nut:
    """dummy-ups + upsd. `ident` is what [power] ups takes."""

    def __init__(self, root: Path, name="dummy", status="OL", runtime=600, charge=100, maxage=15):
        self.dir = root / "nut"
        self.state = self.dir / "state"
        self.name = name
        self.port = free_port()
        self.ident = f"{name}@127.0.0.1:{self.port}"
        self.maxage = maxage
        self.vars = {"ups.status": status, "battery.runtime": runtime, "battery.charge": charge}
        self.driver = self.upsd = self.monitor = None
        self.mtime = time.time() - 1000  # bumped by a whole second on every write_dev
        self.logs = []

    @property
    def env(self):
        state = str(self.state)
        return dict(os.environ, NUT_CONFPATH=str(self.dir), NUT_STATEPATH=state, NUT_ALTPIDPATH=state)

    def _as_root(self):
        # as root, NUT drops to its compiled-in user unless told to stay
        return ["-u", "root"] if os.geteuid() == 0 else []

    def _spawn(self, name, argv, env=None):
        log = open(self.dir / f"{name}.log", "ab")
        self.logs.append(log)
        return subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def log(self, name):
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # setting up

    def start(self):
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        self._write("ups.conf", f'[{self.name}]\n  driver = dummy-ups\n  port = {self.name}.dev\n'
                                '  desc = "appliance test UPS"\n  pollinterval = 1\n')
        self._write("upsd.conf", f"LISTEN 127.0.0.1 {self.port}\nMAXAGE {self.maxage}\n")
        self._write(
            "upsd.users",
            f"[{ADMIN}]\n  password = {ADMIN_PW}\n  actions = SET FSD\n  instcmds = ALL\n  upsmon primary\n"
            f"[{MON}]\n  password = {MON_PW}\n  upsmon secondary\n",
        )
        self.write_dev()
        self.start_driver()
        self.start_upsd()
        return self

    def _write(self, name, text):
        p = self.dir / name
        p.write_text(text)
        os.chmod(p, 0o600)

    def start_driver(self):
        self.driver = self._spawn("driver", [str(DRIVER), "-a", self.name, "-F", *self._as_root()])
        self._wait(lambda: (self.state / f"dummy-ups-{self.name}").exists(), "the dummy-ups driver socket", self.driver)

    def start_upsd(self, timeout=15):
        self.upsd = self._spawn("upsd", [str(UPSD), "-F", *self._as_root()])
        self._wait(lambda: self.get("ups.status") not in (None, "WAIT"), "upsd serving the dummy UPS",
                   self.upsd, timeout)

    def _wait(self, ok, what, proc, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: exited {proc.returncode}:\n{self.log('driver')}\n{self.log('upsd')}")
            time.sleep(0.05)
        raise RuntimeError(f"{what}: not ready in {timeout}s:\n{self.log('driver')}\n{self.log('upsd')}")

    # the UPS

    def get(self, var):
        r = subprocess.run(["upsc", self.ident, var], env=self.env, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    def set(self, var, value):
        """upsrw -s VAR=VALUE: upsd has the new value a moment later (waited for here)."""
        self.update({var: value})

    def update(self, values: dict):
        """Several upsrw at once, then wait until upsd shows them all (within a second or so)."""
        for var, value in values.items():
            subprocess.run(
                ["upsrw", "-s", f"{var}={value}", "-u", ADMIN, "-p", ADMIN_PW, self.ident],
                env=self.env, capture_output=True, text=True, timeout=10, check=True,
            )
            self.vars[var] = value
        for var, value in values.items():
            self.wait_value(var, value)

    def status(self, value):
        self.set("ups.status", value)

    def reset(self):
        """Back to line power, 600 s, 100 %, with no upsmon: the state a test starts from."""
        self.stop_upsmon()
        want = {"ups.status": "OL", "battery.runtime": 600, "battery.charge": 100}
        self.update({k: v for k, v in want.items() if self.get(k) != str(v)})

    def write_dev(self, **changes):
        """Rewrite the .dev file (keyword `ups_status=` for `ups.status`) and bump its mtime."""
        for k, v in changes.items():
            self.vars[k.replace("_", ".")] = v
        p = self.dir / f"{self.name}.dev"
        p.write_text("".join(f"{k}: {v}\n" for k, v in self.vars.items()))
        self.mtime += 1
        os.utime(p, (self.mtime, self.mtime))

    def wait_value(self, var, value, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(var) == str(value):
                return
            time.sleep(0.05)
        raise AssertionError(f"upsd never showed {var} = {value} (now {self.get(var)!r})")

    # breaking it

    def kill_upsd(self):
        _end(self.upsd, signal.SIGKILL)
        self.upsd = None

    def pause_driver(self):
        """SIGSTOP: upsd keeps serving the old data until MAXAGE, then says DATA-STALE."""
        self.driver.send_signal(signal.SIGSTOP)

    def resume_driver(self):
        self.driver.send_signal(signal.SIGCONT)

    # the push path

    def start_upsmon(self, notifycmd, events=NOTIFY_EVENTS, pollfreq=1, env=None, upssched=None):
        """A secondary upsmon on this UPS that runs `notifycmd` (EXEC) for `events`, with `env`
        added to its environment. `upssched`: the text of an upssched.conf to put beside it."""
        if upssched is not None:
            self._write("upssched.conf", upssched)
        flags = "".join(f"NOTIFYFLAG {e} SYSLOG+EXEC\n" for e in events)
        self._write(
            "upsmon.conf",
            f"MONITOR {self.ident} 1 {MON} {MON_PW} secondary\nMINSUPPLIES 1\n"
            f'SHUTDOWNCMD "/bin/true"\nNOTIFYCMD "{notifycmd}"\n'
            f"POLLFREQ {pollfreq}\nPOLLFREQALERT {pollfreq}\nDEADTIME 5\nHOSTSYNC 5\n"
            f"POWERDOWNFLAG {self.state}/killpower\n{flags}",
        )
        # -p: one privileged process, so NOTIFYCMD runs as us and reaches the control socket
        self.monitor = self._spawn("upsmon", [str(UPSMON), "-F", "-p"], env)
        return self.monitor

    def stop_upsmon(self):
        _end(self.monitor)
        self.monitor = None

    def stop(self):
        for p in (self.monitor, self.upsd, self.driver):
            _end(p)
        for f in self.logs:
            f.close()


def _end(proc, sig=signal.SIGTERM):
    if proc is None or proc.poll() is not None:
        return
    if sig == signal.SIGTERM:
        try:
            proc.send_signal(signal.SIGCONT)  # a paused driver cannot act on SIGTERM
        except ProcessLookupError:
            return
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def nut_server(tmp_path_factory):
    """One dummy UPS for a test module (starting NUT takes about 3 s)."""
    need_nut()
    n = Nut(tmp_path_factory.mktemp("nut"))
    try:
        yield n.start()
    finally:
        n.stop()


@pytest.fixture
def nut(nut_server):
    """The module's dummy UPS, on line power with 600 s runtime and 100 % charge.
    Tests that kill or pause upsd or the driver make a `Nut` of their own."""
    nut_server.reset()
    return nut_server
