"""The most this process's resident memory rose while a block ran, sampled every millisecond (`PeakRss`).

Shared by the measurements of sharded loading and checkpointing (tests/test_distributed_loading.py,
bench/sharded_checkpoint.py), so a test and a benchmark count host memory the same way. RSS is what the
process holds from the system: glibc keeps freed small blocks cached unless told otherwise, so a
measurement that must see memory being given back starts its processes with RETURN_FREED_BLOCKS in the
environment (glibc reads MALLOC_MMAP_THRESHOLD_ at start-up: blocks above 64 KiB are mapped on their own and
returned to the system when freed). The sampler is a daemon thread reading /proc through psutil; a block
shorter than a millisecond may be missed, so the value on exit is read once more.
"""

from __future__ import annotations

import threading
import time

RETURN_FREED_BLOCKS = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SAMPLE_SECONDS = 0.001


class PeakRss:
    """with PeakRss() as memory: ...; then memory.gained is the peak RSS above the RSS at construction."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def gained(self) -> int:
        """Bytes: the peak resident set size above the baseline."""
        return self.peak - self.baseline
