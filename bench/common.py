"""What the benchmarks share: the command line, the module they time, the device, FLOP counts, peak TFLOP/s, memory,
the one timer and the JSON record."""

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peaks (TFLOP/s) of GPUs we may be lent; --peak-tflops overrides
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    return (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )


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


def seconds(cases: dict, rounds: int = 1, warmup: int = 0, calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each case (a callable): after ``warmup`` calls each, the cases take turns for
    ``rounds`` rounds of ``calls`` calls, synchronised with the device, so that a slow spell of a shared machine hits
    them all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def arguments(doc: str, **defaults) -> argparse.Namespace:
    """The benchmark's command line: an option per keyword, with its default (a pair: the GPU's, then the CPU's) and
    type, plus --peak-tflops and --out; ``doc`` (the script's docstring) is its --help."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        value = (default[0] if gpu else default[1]) if isinstance(default, tuple) else default
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value) if value is not None else str, default=value, help=f"default {value}")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: known GPUs' bf16 peak)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args()


def bench_module(
    width: int,
    gpu: bool = False,
    compile: bool | None = None,
    bf16: bool | None = None,
    classes: int = 5,
    attention: list[int] | None = None,
    recipe: dict | None = None,
):
    """The improved model at ``width`` (T = 500, ``classes`` classes) with the speed options of a GPU (gpu=True) or all
    off; compile/bf16 override."""
    from ddpm_lightning.testing import tiny_module

    net = dict(width=width, emb_dim=4 * width, heads=4 if width >= 16 else 2)
    if attention is not None:
        net["attention"] = attention
    speed = dict(
        compile=gpu if compile is None else compile, channels_last=gpu, bf16_sampling=gpu if bf16 is None else bf16
    )
    return tiny_module(
        True,
        [str(k) for k in range(classes)],
        net=net,
        schedule=dict(T=500),
        speed=speed,
        recipe=recipe,
        sampler=dict(name="ddim", steps=10),
    )


def record(name: str, images_per_s: float, flops_per_image: float | None, peak: float | None, **extra) -> dict:
    tflops = None if flops_per_image is None else images_per_s * flops_per_image / 1e12
    return dict(
        case=name,
        images_per_s=round(images_per_s, 2),
        tflops=None if tflops is None else round(tflops, 4),
        mfu=None if tflops is None or not peak else round(tflops / peak, 4),
        peak_memory_gb=round(peak_memory_gb(), 3),
        **extra,
    )


def report(benchmark: str, rows: list[dict], out: str | None = None, **extra) -> dict:
    """Print the benchmark's JSON (and write it to ``out`` when given)."""
    result = dict(benchmark=benchmark, device=device_name(), torch=torch.__version__, rows=rows, **extra)
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return result


def diffusers_peer():
    """UNet2DModel at 1.59M parameters (ours: 1.45M): four levels of 16-32-64-64 channels, two ResNet blocks each,
    attention at 8x8 (the example's layout, narrowed), and the example's DDPMScheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    net = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    )
    return net, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
