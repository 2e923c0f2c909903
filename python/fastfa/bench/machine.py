"""Where and with what a run happened: the device, the versions, the commit, the machine's load."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path
from typing import Optional

import torch

import fastfa


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """"cpu: <model>" or the GPU's name, as the results files name devices."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}"


def triton_version() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return None
    return getattr(triton, "__version__", "unknown")


def versions() -> dict:
    return {"torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
            "fastfa": fastfa.__version__}


def git_commit() -> Optional[str]:
    """HEAD of the repository that holds fastfa's sources (else of the cwd), or None."""
    for where in (Path(fastfa.__file__).resolve().parent, Path.cwd()):
        try:
            result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                    timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", result.stdout.strip()):
            return result.stdout.strip()
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_path(device: str, today: Optional[datetime.date] = None, cwd: Optional[Path] = None) -> Path:
    """benchmarks/results/<date>-<device>-bench.json when that folder exists here, else ./fastfa-bench-..."""
    today = today or datetime.date.today()
    cwd = Path.cwd() if cwd is None else cwd
    results = cwd / "benchmarks" / "results"
    if results.is_dir():
        return results / f"{today.isoformat()}-{slug(device)}-bench.json"
    return cwd / f"fastfa-bench-{today.isoformat()}-{slug(device)}.json"


def machine_state() -> dict:
    """What else the machine was doing: its load averages, cores and torch's threads."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"loadavg": load, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def command_line(argv: list) -> str:
    return shlex.join(["fastfa"] + [str(a) for a in argv])
