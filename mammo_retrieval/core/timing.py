"""Wall-clock stage timings, for `--timings` and the benchmarks."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Stopwatch:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - started

    def as_ms(self) -> dict[str, float]:
        return {k: round(v * 1e3, 1) for k, v in self.stages.items()}
