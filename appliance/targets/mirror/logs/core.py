"""core: the dirty-region log in memory (dm-log.c's core_log). A crash forgets which regions
were being written, so a mirror with this log resyncs all of it when it starts, unless told
`nosync`."""

from __future__ import annotations


class CoreLog:
    name = "core"
    durable_marks = False  # a mark must reach the log before its write goes to the legs
    uuid = None  # the mirror's, for a log that keeps one (disk's header, clustered's name)
    marks_lapse = False  # marks_hold() may turn false: every write must ask it (no fast path)

    def attach(self, mirror, parsed):
        """What a log kept outside the mirror needs from it before ctr (clustered's uuid,
        settings and wake-ups); nothing for the logs it holds itself."""

    # construction
    def ctr(self, region_size, region_count, sync=None, dev=None, lock=None, word=None):
        """`sync`: "sync" (resync every region), "nosync" (the legs are equal) or None (as
        the log knows; in memory it knows nothing, so a full resync). `dev`: the log device,
        `word` its name in the table. `lock`: the mirror's, held by whoever changes the
        regions' states."""
        self.lock = lock
        self.word = word
        self.region_size = region_size
        self.region_count = region_count
        self.sync_arg = sync
        self.dev = dev
        self.marked = set()  # regions not clean: writes may be in flight on them
        self.out_of_sync = set() if sync == "nosync" else set(range(region_count))
        self.search = 0  # get_resync_work looks from here (dm's sync_search)
        self.primary = 0  # the leg that is the source for regions out of sync
        self.legs = []  # [(word, dead)]: which legs the log is about, and which are dead
        self.recorded = None  # the legs a log that survives restarts found on its device
        self.recorded_ids = {}  # and what stood behind each leg's word then (legs.identity)
        self.identities = {}  # leg word -> identity, kept with the legs' records
        self.failed = None  # why the log device cannot be written

    def dtr(self):
        pass

    # suspend and resume
    def presuspend(self):
        pass

    def postsuspend(self):
        self.flush()

    def resume(self):
        self.search = 0

    # regions
    def get_region_size(self):
        return self.region_size

    def is_clean(self, region):
        return region not in self.marked

    def in_sync(self, region):
        return region not in self.out_of_sync

    def flush(self):
        pass

    def marks_hold(self):
        """Whether the marks made so far still stand without asking the log again (a
        clustered log's stand only while its node's etcd lease surely lives)."""
        return True

    def mark_region(self, region):
        self.marked.add(region)

    def clear_region(self, region):
        self.marked.discard(region)

    def get_resync_work(self):
        """The next region out of sync from the search point on, or None at the end of a pass
        (the search starts over on resume, or when a region before it goes out of sync)."""
        while self.search < self.region_count:
            r = self.search
            self.search += 1
            if r in self.out_of_sync:
                return r
        return None

    def set_region_sync(self, region, in_sync):
        if in_sync:
            self.out_of_sync.discard(region)
        else:
            self.out_of_sync.add(region)
            self.search = min(self.search, region)

    def get_sync_count(self):
        return self.region_count - len(self.out_of_sync)

    # the legs: which is the source where they differ and which are dead; the disk log keeps
    # them across restarts (its legs' sidecar records)
    def set_primary(self, leg):
        self.primary = leg

    def set_legs(self, legs):
        self.legs = list(legs)

    def set_leg_dead(self, index, dead):
        self.legs[index] = (self.legs[index][0], dead)

    def set_identities(self, ids):
        self.identities = dict(ids)

    # reporting
    def status(self):
        """dm's INFO words for the log."""
        return ["1", "core"]

    def status_table(self):
        words = [str(self.region_size // 512)] + ([self.sync_arg] if self.sync_arg else [])
        return ["core", str(len(words)), *words]
