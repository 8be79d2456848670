"""What the benchmarks share: the device, FLOP counts, peak TFLOP/s, memory, timing and the JSON record."""

import json
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peaks (TFLOP/s) of GPUs we may be lent; --peak-tflops overrides
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    name = device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops(fn) -> int:
    """FLOPs of one call of fn, counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """Peak GPU memory of this case, or on the CPU the process's resident high-water mark so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, warmup: int, repeats: int) -> float:
    """Seconds per call of fn after warm-up, synchronised with the device."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def record(name: str, images_per_s: float, flops_per_image: float | None, peak: float | None, **extra) -> dict:
    tflops = None if flops_per_image is None else images_per_s * flops_per_image / 1e12
    return dict(case=name, images_per_s=round(images_per_s, 2), tflops=None if tflops is None else round(tflops, 4),
                mfu=None if tflops is None or not peak else round(tflops / peak, 4), peak_memory_gb=round(peak_memory_gb(), 3), **extra)


def report(benchmark: str, rows: list[dict], out: str | None = None, **extra) -> dict:
    """Print the benchmark's JSON (and write it to ``out`` when given)."""
    result = dict(benchmark=benchmark, device=device_name(), torch=torch.__version__, rows=rows, **extra)
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return result
