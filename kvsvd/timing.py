"""Per-stage wall-clock breakdown: CUDA events on GPU, synchronised perf_counter on CPU."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

STAGES = ("preparation", "projection", "power_iteration", "final_qr", "small_svd_fp32", "lift")


class StageTimer:
    """Accumulates milliseconds per named stage over one or more calls.

    >>> t = StageTimer(); U, S, Vh = rsvd(A, 64, timer=t); t.breakdown_ms()
    {'preparation': 0.4, 'projection': 3.1, ...}
    """

    def __init__(self) -> None:
        self._cpu_ms: dict[str, float] = {}
        self._cuda_events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._cuda_events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms[name] = self._cpu_ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def breakdown_ms(self) -> dict[str, float]:
        """Milliseconds per stage, in pipeline order (synchronises CUDA once)."""
        out = dict(self._cpu_ms)
        if self._cuda_events:
            torch.cuda.synchronize()
            for name, pairs in self._cuda_events.items():
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        order = {s: i for i, s in enumerate(STAGES)}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))

    def total_ms(self) -> float:
        return sum(self.breakdown_ms().values())


@contextmanager
def maybe_stage(timer: StageTimer | None, name: str, device: torch.device) -> Iterator[None]:
    """``timer.stage`` when a timer is given, else nothing (no synchronisation cost)."""
    if timer is None:
        yield
    else:
        with timer.stage(name, device):
            yield
