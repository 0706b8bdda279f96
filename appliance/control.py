"""The control socket: one JSON request, one JSON answer, per connection.

The CLI is a client of it; so are upsmon's NOTIFYCMD (`appliance power`) and
the tests. Unix socket only, owner-only permissions: whoever can talk to it
can suspend devices.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


class ControlServer:
    def __init__(self, path, handler):
        self.path = path
        self.handler = handler  # handler(request: dict) -> dict; raises to report an error
        self.sock = None

    def start(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
            probe.close()
            raise ControlError(f"{self.path}: another daemon is listening there")
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self.sock = s
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def stop(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept(self):
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.settimeout(10)
                request = json.loads(_read_all(conn))
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ControlError("a request is a JSON object with a 'cmd'")
                conn.settimeout(None)  # long operations (drain) answer when done
                answer = {"ok": True, **(self.handler(request) or {})}
            except ControlError as e:
                answer = {"ok": False, "error": str(e)}
            except (ValueError, socket.timeout) as e:
                answer = {"ok": False, "error": f"bad request: {e}"}
            except Exception as e:  # the daemon carries on whatever a request did
                log.exception("control request failed")
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass


def _read_all(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ControlError("request too large")
    return data


def call(path, cmd, timeout=None, **args):
    """Send one request to the daemon at `path`; return its answer or raise ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no daemon is listening on {path} (is `appliance serve` running?)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the control socket is root's)") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = _read_all(s)
    except socket.timeout:
        raise ControlError(f"the daemon on {path} did not answer in {timeout}s") from None
    finally:
        s.close()
    if not data:
        raise ControlError("the daemon closed the control connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "unknown error"))
    return answer
