"""The mirror's messages and status (dm's message and STATUSTYPE_INFO/TABLE)."""

from __future__ import annotations

from .. import TargetError, parse_size

MESSAGES = "fail_leg L, reinstate_leg L, resync, verify, set_primary L, resync_rate BYTES/s"


class Control:
    """Mixed into Mirror."""

    def message(self, argv):
        if not argv:
            raise TargetError(f"mirror messages: {MESSAGES}")
        cmd, args = argv[0], argv[1:]
        want = 1 if cmd in ("fail_leg", "reinstate_leg", "set_primary", "resync_rate") else 0
        if cmd not in ("fail_leg", "reinstate_leg", "set_primary", "resync_rate", "resync", "verify"):
            raise TargetError(f"unknown mirror message {cmd!r}; messages: {MESSAGES}")
        if len(args) != want:
            raise TargetError(f"{cmd} takes {'one argument' if want else 'no arguments'}")
        if cmd == "fail_leg":
            leg = self.leg(args[0])
            if leg.dead:
                return f"leg {leg.word} is already dead"
            self.fail_leg(leg, "failed by message")
            return f"leg {leg.word} failed"
        if cmd == "reinstate_leg":
            leg = self.leg(args[0])
            if not self.reinstate_leg(leg):
                return f"leg {leg.word} is not dead"
            return f"leg {leg.word} reinstated; {len(leg.stale)} regions to resync"
        if cmd == "set_primary":
            return self._set_primary(self.leg(args[0]))
        if cmd == "resync_rate":
            rate = parse_size(args[0], "resync_rate")
            self.resync.rate = rate
            return f"resync rate {rate} bytes/s" if rate else "resync rate adaptive"
        if cmd == "resync":
            return self._resync_all()
        return self.resync.start_verify()

    def _set_primary(self, leg):
        with self.lock:
            if leg.dead or leg.stale:
                raise TargetError(f"leg {leg.word} is {leg.state}: only a leg in sync can be the primary")
            self._set_primary_index(leg.index)
            self.regions.after_flush(lambda e: None)  # the writer records it now
        return f"leg {leg.word} is the primary"

    def _resync_all(self):
        """Copy every region from the primary to the other legs again."""
        with self.lock:
            for r in range(self.region_count):
                self.set_region_sync(r, False)
            for leg in self.legs:
                if leg.index != self.primary:
                    leg.stale = set(range(self.region_count))
            self.regions.after_flush(lambda e: None)
        self.resync.kick()
        return f"resyncing {self.region_count} regions from leg {self.legs[self.primary].word}"

    def status_info(self):
        with self.lock:
            legs = []
            for leg in self.legs:
                d = {"dev": leg.word, "state": leg.state, "stale_regions": len(leg.stale)}
                if leg.dead:
                    d["why"] = leg.why
                if leg.note:
                    d["note"] = leg.note
                legs.append(d)
            info = {
                "legs": legs,
                "primary": self.legs[self.primary].word,
                "region_size": self.region_size,
                "in_sync_regions": self.log.get_sync_count(),
                "total_regions": self.region_count,
                "resynced_regions": self.resync.resynced,
                "repairs": self.repairs,
                "resync": self.resync.progress(),
                "verify": self.resync.verify_status(),
                "log": {"type": self.log.name, "state": "failed" if self.log.failed else "ok",
                        "log_writes": self.regions.log_writes, "uuid": self.log.uuid},
                "handle_errors": self.handle_errors,
                # writes the NBD loop fanned out itself; those a leg failed went the slow way
                "fast_writes": self.fastmap.writes if self.fastmap is not None else None,
                "fast_writes_failed": self.fastmap.failed if self.fastmap is not None else None,
                # reads the NBD loop served from one leg itself; those a leg failed went the slow way
                "fast_reads": sum(self.fastmap.leg_reads) if self.fastmap is not None else None,
                "fast_reads_per_leg": self.fastmap.leg_reads if self.fastmap is not None else None,
                "fast_reads_failed": self.fastmap.reads_failed if self.fastmap is not None else None,
            }
            if self.log.failed:
                info["log"]["error"] = self.log.failed
        return info

    def status_line(self):
        """dm's INFO line: <#legs> <leg>... <in_sync>/<total> 1 <health> <log status...>"""
        with self.lock:
            words = [str(len(self.legs)), *(leg.word for leg in self.legs),
                     f"{self.log.get_sync_count()}/{self.region_count}", "1",
                     "".join(leg.letter for leg in self.legs), *self.log.status()]
        return " ".join(words)

    def status_table(self):
        words = list(self.log.status_table())
        words.append(str(len(self.legs)))
        for leg in self.legs:
            words += [leg.word, str(leg.offset // 512)]
        if self.features:
            words += [str(len(self.features)), *self.features]
        return words
