"""The map's clocks, on a thread of their own that ticks TICK apart (the checker's thread
may sit in a probe of a hung path for checker_timeout, so it keeps no time):

- fast_io_fail_tmo: a path that has held a request that long without an answer is hung;
  the target fails it and gives up on what it holds (Multipath.path_hung).
- no_path_retry: N x polling_interval after the last path was lost, the wait ends and what
  is held fails (Multipath.no_path_retry_expired), as multipathd's timer: counting checker
  rounds instead would stretch the wait by every probe that hangs.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("appliance.multipath")

TICK = 0.1  # seconds


class Timers:
    def __init__(self, target):
        self.target = target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multipath-timers", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self):
        while not self._stop.wait(TICK):
            try:
                self.tick(time.monotonic())
            except Exception:  # the clocks must outlive a bug in one tick
                log.exception("multipath timers failed")

    def tick(self, now):
        t = self.target
        tmo = t.fast_io_fail_tmo
        hung = []
        with t._lock:
            if tmo > 0:
                for path in t.all_paths():
                    oldest = path.oldest()
                    # once per fast_io_fail_tmo: what it held ends within its device's tick
                    if oldest is not None and now - oldest >= tmo and now - path.aborted_at >= tmo:
                        path.aborted_at = now
                        hung.append(path)
            since = t._no_path_since
            expired = (since is not None and t.no_path_retry and not t._retry_expired
                       and now >= since + t.no_path_retry * t.polling_interval)
        for path in hung:
            t.path_hung(path)
        if expired:
            t.no_path_retry_expired()
