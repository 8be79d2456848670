"""DDPM and classifier-free guidance on CIFAR-10 subsets (PyTorch Lightning + Hydra)."""

import os
import time

from omegaconf import OmegaConf


def _gpu_or(on_gpu, otherwise, *, _root_):
    """${gpu_or:A,B} in conf/: A when a CUDA device is present (the fast defaults), else B (CPU: fp32, eager), as
    speed.profile=auto says; speed.profile=gpu takes A and speed.profile=cpu takes B on any machine (gpu on a CPU is
    the test suite's dress rehearsal of the GPU path: bf16-mixed, compile, channels_last, bf16 sampling)."""
    import torch

    profile = OmegaConf.select(_root_, "speed.profile", default="auto")
    if profile == "auto":
        return on_gpu if torch.cuda.is_available() else otherwise
    return on_gpu if profile == "gpu" else otherwise


OmegaConf.register_new_resolver("gpu_or", _gpu_or, replace=True)


def _job_or_now(pattern: str) -> str:
    """${job_or_now:%Y-%m-%d/%H-%M-%S} in conf/: under srun, slurm/<job id>[_<array task>]/step<step id>, the same for every
    rank and for the job after a requeue (so it resumes there); else the time now."""
    job, step = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm/{job}{'_' + task if task else ''}/step{step}"
    return time.strftime(pattern)


OmegaConf.register_new_resolver("job_or_now", _job_or_now, replace=True, use_cache=True)
