"""DDPM and classifier-free guidance on CIFAR-10 subsets (PyTorch Lightning + Hydra)."""

import os
import time

from omegaconf import OmegaConf


def _gpu_or(on_gpu, otherwise):
    """${gpu_or:A,B} in conf/: A when a CUDA device is present (the fast defaults), else B (CPU: fp32, eager)."""
    import torch

    return on_gpu if torch.cuda.is_available() else otherwise


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
