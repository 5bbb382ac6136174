"""A window of training steps under ``torch.profiler``: a trace to open in Perfetto, and how busy the
device was in it (``cs336-basics train --profile-steps N``).

The device-busy figure is the summed kernel time of the window over its wall time. Below 1, the GPU
waited for the host between kernels (launch overhead, Python, data loading, syncs). The profiler
records every op, so the steps it watches run a little slower than the rest.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


class StepProfiler:
    """``start()`` before the first step of the window, ``stop(steps)`` after its last one (it waits for
    the device); ``close()`` ends a window cut short, without a summary. One window per object."""

    def __init__(self, device: torch.device, trace_path: Path, top: int = 12):
        self.device, self.trace_path, self.top = device, Path(trace_path), top
        self._prof = None
        self._t0 = 0.0

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def stop(self, steps: int) -> dict:
        """The window's summary: wall and device-busy ms per step, the top kernels (CPU: ops), the trace."""
        if self._prof is None:
            raise RuntimeError("StepProfiler.stop() without start()")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_ms = 1e3 * (time.perf_counter() - self._t0) / steps
        prof = self._prof
        self.close()
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        events = prof.key_averages()
        on_device = self.device.type == "cuda"
        if on_device:
            rows = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type.name == "CUDA"]
        else:
            rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
        rows.sort(key=lambda r: -r[1])
        busy_ms = sum(r[1] for r in rows) / 1e3 / steps if on_device else None
        return {
            "steps": steps,
            "wall_ms_per_step": round(wall_ms, 3),
            "device_busy_ms_per_step": None if busy_ms is None else round(busy_ms, 3),
            "device_busy_fraction": None if busy_ms is None else round(busy_ms / wall_ms, 3),
            "top": [{"name": name[:120], "ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": n / steps}
                    for name, us, n in rows[:self.top]],
            "trace": str(self.trace_path),
        }
