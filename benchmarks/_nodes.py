"""What the benchmarks share: the machine they ran on, and per-node figures of a Nipype run."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    """The machine a benchmark ran on: CPU model, cores, versions, threads, load, GPU."""
    import numpy as np
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fobj:
        for line in fobj:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fobj:
            fobj.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


class NodeMeter:
    """Nipype status callback: per-node wall time, CPU time and peak RSS (in-process plugins)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self._start: dict[str, tuple[float, float, int]] = {}

    def __call__(self, node, status):
        name = node.fullname
        if status == "start":
            self._start[name] = (time.perf_counter(), time.process_time(), _status_kb("VmRSS"))
            _reset_peak()
        elif status in ("end", "exception"):
            t0, c0, rss0 = self._start.pop(name, (time.perf_counter(), time.process_time(), 0))
            self.rows[name] = {"node": name, "status": status,
                               "wall_s": round(time.perf_counter() - t0, 3),
                               # CPU seconds of this process (all its threads): on a shared
                               # machine a steadier figure than the wall time
                               "cpu_s": round(time.process_time() - c0, 3),
                               "peak_rss_gb": round(_status_kb("VmHWM") / 1024 ** 2, 3),
                               "rss_at_start_gb": round(rss0 / 1024 ** 2, 3)}


def monitor_rows(work_dir: Path) -> list[dict]:
    """Per-node runtime figures of Nipype's resource monitor, from the node result files: wall
    time, CPU time (wall x the monitor's mean CPU use) and peak RSS."""
    from nipype.pipeline.engine.utils import load_resultfile

    rows = []
    for result in sorted(Path(work_dir).rglob("result_*.pklz")):
        runtime = load_resultfile(str(result)).runtime
        wall = float(getattr(runtime, "duration", float("nan")))
        percent = getattr(runtime, "cpu_percent", None)
        rows.append({"node": str(result.parent.relative_to(work_dir)),
                     "wall_s": round(wall, 3),
                     "cpu_s": None if percent is None else round(wall * float(percent) / 100, 3),
                     "peak_rss_gb": round(float(getattr(runtime, "mem_peak_gb", float("nan"))), 3),
                     "cpu_percent": percent})
    return rows


def markdown_rows(rows: list[dict]) -> str:
    lines = ["| node | wall (s) | CPU (s) | peak RSS (GB) |", "|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: -r["wall_s"]):
        name = ".".join(row["node"].replace("/", ".").split(".")[-2:])
        cpu = row.get("cpu_s")
        lines.append(f"| {name} | {row['wall_s']:.1f} | {'n/a' if cpu is None else f'{cpu:.1f}'} "
                     f"| {row['peak_rss_gb']:.2f} |")
    return "\n".join(lines)
