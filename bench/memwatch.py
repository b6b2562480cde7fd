"""Peak resident memory of this process during a block (sampled every 5 ms)."""
from __future__ import annotations

import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20
