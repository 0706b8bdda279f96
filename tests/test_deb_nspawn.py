"""The real thing: the .deb in a minimal Debian 12 booted with systemd under systemd-nspawn.

dpkg -i starts the service; an export answers nbdinfo from the host (the container shares the host's
network); `systemctl reload` applies an edited config; `systemctl stop` drains; `dpkg --purge`
leaves nothing behind.

Cached between runs under $APPLIANCE_TEST_CACHE (default /var/cache/appliance-tests): the
debootstrapped rootfs (keyed by the package list: systemd, dbus and the .deb's Depends) and the
.deb (keyed by the content of what goes into it). Each run boots an overlay of the cached rootfs,
so the cache is never modified. Cold: debootstrap (~2-3 min) and the package build (~2-3 min).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance-tests"))
MIRROR = os.environ.get("APPLIANCE_TEST_MIRROR", "http://deb.debian.org/debian")
BOOT_PACKAGES = ["systemd", "systemd-sysv", "dbus"]
# what goes into the .deb: a change here rebuilds it
DEB_INPUTS = ["appliance", "packaging", "systemd", "etc", "pyproject.toml", "setup.py", "README.md"]
PORT = 10809  # the shipped config's TCP listener

pytestmark = pytest.mark.timeout(1800)


def _tools():
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-buildpackage") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages debootstrap, systemd-container, util-linux, dpkg-dev)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, systemd-nspawn, overlay mounts)")


def deb_depends():
    """The binary package's Depends from packaging/debian/control, without versions and substvars."""
    text = (REPO / "packaging/debian/control").read_text()
    block = text.split("Package: appliance", 1)[1]
    m = re.search(r"^Depends:(.*?)(?=^\S)", block, re.M | re.S)
    names = []
    for item in m.group(1).split(","):
        item = item.strip()
        if item and not item.startswith("$"):
            names.append(item.split()[0])
    return sorted(set(names))


def rootfs() -> Path:
    packages = sorted(set(BOOT_PACKAGES + deb_depends()))
    key = hashlib.sha256(" ".join(packages + [MIRROR]).encode()).hexdigest()[:12]
    root = CACHE / f"bookworm-minbase-{key}"
    if (root / "usr/bin/systemctl").exists():
        return root
    tmp = CACHE / f".bookworm-minbase-{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={','.join(packages)}", "bookworm", str(tmp), MIRROR, timeout=1500)
    # the container boots with the host's network and no getty: keep the boot short
    for unit in ("getty@tty1.service", "console-getty.service"):
        run("chroot", str(tmp), "systemctl", "mask", unit, check=False)
    (tmp / "etc/hostname").write_text("appliance-test\n")
    tmp.rename(root)
    return root


def deb() -> Path:
    h = hashlib.sha256()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *DEB_INPUTS],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in sorted(files):
        p = REPO / f
        if p.is_file():
            h.update(f.encode() + b"\0" + p.read_bytes() + b"\0")
    out = CACHE / "debs" / h.hexdigest()[:16]
    found = sorted(out.glob("appliance_*.deb"))
    if found:
        return found[-1]
    tmp = Path(f"{out}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    run(str(REPO / "packaging/build-deb"), str(tmp), timeout=1500)
    tmp.rename(out)
    for old in sorted((CACHE / "debs").iterdir(), key=lambda p: p.stat().st_mtime)[:-5]:
        shutil.rmtree(old, ignore_errors=True)  # keep the last five builds
    return sorted(out.glob("appliance_*.deb"))[-1]


class Container:
    def __init__(self, lower: Path, work: Path):
        self.dir = work
        self.root = work / "root"
        for d in ("upper", "work", "root"):
            (work / d).mkdir()
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", str(self.root))
        self.log = open(work / "console.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit", "--console=passive",
             "--resolv-conf=off", "--timezone=off", "--link-journal=no"],
            env=dict(os.environ, SYSTEMD_NSPAWN_TMPFS_TMP="1"),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.pid = self._init_pid()

    def _init_pid(self, timeout=30):
        """The container's PID 1 as the host sees it: a descendant of nspawn that is 1 in its namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if nspid and nspid.group(1).split()[-1] == "1" and len(nspid.group(1).split()) > 1 \
                        and self._descends(int(entry)):
                    return int(entry)
            time.sleep(0.1)
        raise AssertionError(f"no container init in {timeout}s:\n{self.console()}")

    def _descends(self, pid):
        for _ in range(10):
            try:
                ppid = int(re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
            except (OSError, AttributeError):
                return False
            if ppid == self.proc.pid:
                return True
            if ppid <= 1:
                return False
            pid = ppid
        return False

    def sh(self, *cmd, check=True, timeout=120):
        return run("nsenter", "-t", str(self.pid), "-a", "--", *cmd, check=check, timeout=timeout)

    def console(self):
        self.log.flush()
        return (self.dir / "console.log").read_text(errors="replace")[-4000:]

    def wait_booted(self, timeout=90):
        """Until systemd inside says the boot is over (PID 1 may still be nspawn's stub at first)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        raise AssertionError(f"container did not boot: {state!r}\n{self.console()}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        run("umount", str(self.root), check=False)
        if os.path.ismount(self.root):
            run("umount", "-l", str(self.root), check=False)


def snapshot(root: Path):
    """Every path under the places a package may leave something, minus dpkg's and the logs' own."""
    out = set()
    skip = ("var/lib/dpkg", "var/log", "var/cache", "var/lib/apt", "var/lib/systemd/catalog",
            "var/lib/systemd/timers", "var/lib/systemd/random-seed", "var/lib/systemd/deb-systemd-user-helper-enabled",
            "etc/ld.so.cache", "var/tmp", "root")
    for top in ("etc", "usr", "var", "opt", "srv", "root"):
        base = root / top
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, root)
            if rel.startswith(skip):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                out.add(os.path.join(rel, name))
    return out


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_deb_installs_serves_reloads_drains_and_purges_under_systemd(tmp_path):
    _tools()
    t_start = time.monotonic()
    lower = rootfs()
    package = deb()
    t_ready = time.monotonic()
    assert _port_free(PORT), f"127.0.0.1:{PORT} is taken on the host; the container shares the host network"
    c = Container(lower, tmp_path)
    try:
        c.wait_booted()
        before = snapshot(c.root)
        shutil.copy(package, c.root / "root/appliance.deb")

        # dpkg -i: enabled and started (Type=notify: active means READY=1 came)
        c.sh("dpkg", "-i", "/root/appliance.deb", timeout=180)
        state = c.sh("systemctl", "is-active", "appliance", check=False).stdout.strip()
        assert state == "active", f"{state}\n" + c.sh("journalctl", "-u", "appliance", "--no-pager", check=False).stdout
        assert c.sh("systemctl", "is-enabled", "appliance").stdout.strip() == "enabled"
        status = c.sh("systemctl", "show", "-p", "StatusText", "--value", "appliance").stdout
        assert status.startswith("1 device;"), status

        # an export answers from the host
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{PORT}/disk0").stdout.strip() == str(1 << 30)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", f"nbd://127.0.0.1:{PORT}/disk0")

        # systemctl reload applies an edited config
        conf = c.root / "etc/appliance/appliance.toml"
        extra = '\n[[device]]\nname = "disk1"\ntable = ["0 65536 linear /var/lib/appliance/disk1.img 0"]\n'
        ramback = (REPO / "appliance/targets/ramback").exists()
        if ramback:
            extra += '\n[[device]]\nname = "rb"\ntable = ["0 65536 ramback - /var/lib/appliance/rb.img max_dirty=64M"]\n'
            extra += '\n[power]\nups = "none"\n'  # no UPS, on purpose: writeback, so stop has something to drain
        c.sh("truncate", "-s", "32M", "/var/lib/appliance/disk1.img", "/var/lib/appliance/rb.img")
        conf.write_text(conf.read_text() + extra)
        c.sh("systemctl", "reload", "appliance")
        assert c.sh("systemctl", "is-active", "appliance").stdout.strip() == "active"
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{PORT}/disk1").stdout.strip() == str(32 << 20)
        status = c.sh("systemctl", "show", "-p", "StatusText", "--value", "appliance").stdout
        assert status.startswith(f"{3 if ramback else 2} devices;"), status
        if ramback:
            run("qemu-io", "-f", "raw", "-c", "write -P 0x5e 0 8M", f"nbd://127.0.0.1:{PORT}/rb")

        # systemctl stop drains, flushes and exits 0
        c.sh("systemctl", "stop", "appliance", timeout=300)
        show = c.sh("systemctl", "show", "-p", "Result,ExecMainStatus,ActiveState", "appliance").stdout
        assert "Result=success" in show and "ExecMainStatus=0" in show, show
        journal = c.sh("journalctl", "-u", "appliance", "--no-pager", "-o", "cat").stdout
        assert "stopped" in journal, journal
        with open(c.root / "var/lib/appliance/disk0.img", "rb") as f:
            assert f.read(1 << 20) == b"\x3c" * (1 << 20)
        if ramback:
            with open(c.root / "var/lib/appliance/rb.img", "rb") as f:
                assert f.read(8 << 20) == b"\x5e" * (8 << 20), "ramback's dirty data was not drained on stop"

        # dpkg --purge leaves nothing behind
        c.sh("dpkg", "--purge", "appliance", timeout=120)
        (c.root / "root/appliance.deb").unlink()
        left = sorted(snapshot(c.root) - before)
        assert not left, f"left behind by purge: {left}"
        assert c.sh("test", "-e", "/run/appliance", check=False).returncode != 0
        assert "appliance" not in c.sh("ls", "/dev/shm").stdout, "a RAM store outlived the purge"
        assert c.sh("systemctl", "cat", "appliance", check=False).returncode != 0
    finally:
        c.close()
    print(f"nspawn test: {t_ready - t_start:.0f}s preparing (rootfs, .deb), {time.monotonic() - t_ready:.0f}s in the container")


def test_the_shipped_config_is_the_embedded_default():
    """/etc/appliance/appliance.toml as installed serves what the daemon would serve with no file."""
    from appliance import config as cfg

    shipped, embedded = cfg.load(str(REPO / "etc/appliance/appliance.toml")), cfg.embedded_default()
    assert (shipped.daemon, shipped.export, shipped.devices, shipped.power) == (
        embedded.daemon, embedded.export, embedded.devices, embedded.power)
    image, size = embedded.needs_default_image
    assert f"truncate -s {size >> 30}G {image}" in (REPO / "packaging/debian/postinst").read_text()


def test_the_unit_is_notify_with_watchdog_reload_drain_and_hardening():
    unit = (REPO / "systemd/appliance.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "notify" and keys["ExecStart"] == "/usr/bin/appliance serve"
    assert "reload" in keys["ExecReload"] and keys["WatchdogSec"] and keys["TimeoutStopSec"] not in ("infinity", "0")
    for k in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert keys[k] == "yes", k
    assert keys["LimitMEMLOCK"] and keys["RuntimeDirectory"] == "appliance"
    assert "PrivateDevices" not in keys and "DevicePolicy" not in keys, "the daemon opens raw disks"
    assert "AF_NETLINK" in keys["RestrictAddressFamilies"], "kernel block events come over netlink"
