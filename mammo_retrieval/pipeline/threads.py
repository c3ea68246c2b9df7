"""How many CPU threads the encoder gets while worker processes preprocess."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mammo_retrieval.encoders.model import TorchEncoder as Encoder


class EncoderThreads:
    """torch's CPU threads during an ingest, restored afterwards (the setting is process-wide).

    ``auto`` starts at one thread, right for the built-in encoder: the workers are the bottleneck and extra
    encoder threads only compete with them (2 cores: ingest 1.25x faster than with two). If the probe
    batches show the main process hardly ever waiting for the workers, the encoder is the bottleneck
    (ResNet-50 at 224 px) and gets every core from then on. Without workers, or on a GPU, torch's own
    setting stays. A number fixes the count.
    """

    def __init__(self, encoder: "Encoder", setting: int | str, workers: int, *, probe_batches: int = 2,
                 cores: int | None = None) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.encoder = encoder
        on_cpu = encoder.device.type == "cpu"
        self.adaptive = setting == "auto" and workers > 0 and on_cpu
        if setting == "auto":
            self.initial = 1 if self.adaptive else None
        else:
            self.initial = int(setting) if on_cpu else None
        self.probe_batches = probe_batches
        self.batches = 0
        self.wait_s = 0.0
        self.embed_s = 0.0
        self.decided = not self.adaptive
        self._previous: int | None = None

    def _threads(self) -> int:
        """The encoder's own thread count where it has one (ONNX Runtime), else torch's process-wide one."""
        if hasattr(self.encoder, "threads"):
            return self.encoder.threads
        import torch
        return torch.get_num_threads()

    def _set_threads(self, n: int) -> None:
        if hasattr(self.encoder, "threads"):
            self.encoder.threads = n
            return
        import torch
        torch.set_num_threads(n)

    def __enter__(self) -> "EncoderThreads":
        if self.initial is not None:
            self._previous = self._threads()
            self._set_threads(self.initial)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            self._set_threads(self._previous)

    def waited(self, seconds: float) -> None:
        """The main process waited this long for a worker's result."""
        if self.batches >= 1:  # the first batch waits for the workers to start: not evidence
            self.wait_s += seconds

    def embedded(self, seconds: float) -> None:
        """One batch took this long to embed."""
        self.batches += 1
        if self.batches >= 2:
            self.embed_s += seconds
        if not self.decided and self.batches >= 1 + self.probe_batches:
            self.decided = True
            if self.wait_s < 0.2 * self.embed_s and self.cores > 1:
                self._set_threads(self.cores)
