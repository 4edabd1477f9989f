"""Shared benchmark helpers: the machine, interleaved repeats, medians, tables, result files.

Every benchmark compares variants measured side by side in one process: each repeat runs every
variant once, in a rotated order, so slow drift on a shared machine (other jobs, thermal, page
cache) hits all variants alike. Warm-up runs are never timed. A ratio is taken per repeat
(paired) and reported as the median with its min..max spread.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets. Keys are
# matched as substrings of torch.cuda.get_device_name(), first match wins (specific names first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: repeats, warm-up, device, seed, output folder."""
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs of each variant (median and spread reported)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto = CUDA when present, else CPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, weights and batch order")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="wall time, or this process's CPU time (steadier on a busy machine)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json is written"
    )


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (how busy the shared machine was)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: Any = None) -> dict[str, Any]:
    """CPU, core and thread counts, library versions and the GPU (if any) the run used."""
    import torch

    machine = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device or "cpu"),
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
    return machine


def peak_bf16_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak (FLOP/s) from ``PEAK_BF16_FLOPS``, or None if unknown."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def synchronize(device: Any) -> None:
    """Wait for queued GPU work (a timer must not stop while kernels still run)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# A variant is prepared untimed (build the model, the trainer...) and returns the call to time.
Variant = Callable[[], Callable[[], Any]]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_interleaved(
    variants: dict[str, Variant],
    repeats: int,
    warmup: int,
    device: Any = "cpu",
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds of each variant's timed call: ``warmup`` untimed rounds, then ``repeats`` timed.

    Each round prepares and runs every variant once; the order rotates by one each round.
    ``clock="cpu"`` counts this process's CPU time instead of wall time: far less sensitive to
    other jobs on a shared machine, but blind to waiting (GPU, disk, other threads' spinning).
    """
    timer = CLOCKS[clock]
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            call = variants[name]()
            synchronize(device)
            start = timer()
            call()
            synchronize(device)
            seconds[name].append(timer() - start)
    return seconds


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max - min) / median) of some measurements."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else 0.0,
        "n": len(values),
    }


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[i] / denominator[i]`` for each repeat (the two were timed in one round)."""
    return [num / den for num, den in zip(numerator, denominator, strict=True)]


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Summary of the paired ratios, plus ``of_min``: the ratio of the two fastest runs (the
    least disturbed estimate when other jobs share the machine)."""
    return {
        **summarize(paired_ratios(numerator, denominator)),
        "of_min": min(numerator) / min(denominator),
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table (floats to 4 significant digits)."""

    def _cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<name>.json`` atomically, stamped with the time; return the path."""
    from stages.common.io import write_json

    path = Path(results_dir) / f"{name}.json"
    write_json(
        path,
        {
            "benchmark": name,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **payload,
        },
    )
    return path


def prepare_run(args: argparse.Namespace) -> Any:
    """What every training benchmark does first: quiet logs, torch threads; returns the device."""
    import logging
    import sys

    from model.nets import select_device

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    configure_torch(args.threads)
    return select_device(args.device)


def configure_torch(threads: int) -> None:
    """Set torch's intra-op thread count when asked (0 leaves torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
