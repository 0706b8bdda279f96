"""The whole chain: export -> nbdfuse file -> loop device -> ext4 -> files, and back."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from conftest import device, need, run, wait_for

MiB = 1 << 20


def _usable_loop():
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop-control missing)"
    if os.geteuid() != 0:
        return "loop devices and mount need root"
    return None


def _mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ext4_on_a_loop_device_over_nbdfuse_keeps_files_across_remounts(make_daemon, image, tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    reason = _usable_loop()
    if reason:
        pytest.skip(reason)
    need("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3")
    disk = image("disk.img", 64 * MiB)
    d = make_daemon(device("data0", f"0 {32 * MiB // 512} linear {disk} 0", f"{32 * MiB // 512} {32 * MiB // 512} linear {disk} {32 * MiB // 512}"))
    fuse_dir, fs_dir = tmp_path / "fuse", tmp_path / "fs"
    fuse_dir.mkdir()
    fs_dir.mkdir()
    nbd_file = fuse_dir / "nbd"
    fuse = loop = None
    try:
        fuse = subprocess.Popen(["nbdfuse", str(fuse_dir), d.uri("data0")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: _mounted(fuse_dir) and nbd_file.exists() or fuse.poll() is not None, 20, "nbdfuse to mount")
        assert fuse.poll() is None, fuse.communicate()[0]
        assert nbd_file.stat().st_size == 64 * MiB
        loop = run("losetup", "--find", "--show", str(nbd_file)).stdout.strip()
        assert loop.startswith("/dev/loop")
        run("mkfs.ext4", "-q", "-F", loop, timeout=120)
        run("mount", loop, str(fs_dir))
        files = {}
        for i in range(8):
            p = fs_dir / f"file{i}.bin"
            p.write_bytes(os.urandom(100_000 * (i + 1)))
            files[p.name] = _sha(p)
        (fs_dir / "sub").mkdir()
        (fs_dir / "sub" / "note.txt").write_text("written through the whole chain\n")
        run("umount", str(fs_dir))
        # the file system reached the backing file: ext4's magic at 1024 + 56
        with open(disk, "rb") as f:
            f.seek(1024 + 56)
            assert f.read(2) == b"\x53\xef"
        run("mount", loop, str(fs_dir))
        for name, digest in files.items():
            assert _sha(fs_dir / name) == digest, name
        assert (fs_dir / "sub" / "note.txt").read_text() == "written through the whole chain\n"
        run("umount", str(fs_dir))
        fsck = run("e2fsck", "-fn", loop, check=False, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        if _mounted(fs_dir):
            subprocess.run(["umount", "-l", str(fs_dir)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
            try:
                fuse.wait(10)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
            if _mounted(fuse_dir):
                subprocess.run(["fusermount3", "-uz", str(fuse_dir)], capture_output=True)
    assert not _mounted(fuse_dir) and not _mounted(fs_dir)
    assert d.proc.poll() is None
