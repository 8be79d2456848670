"""DDPM and classifier-free guidance on CIFAR-10 subsets (PyTorch Lightning + Hydra)."""

from omegaconf import OmegaConf


def _gpu_or(on_gpu, otherwise):
    """${gpu_or:A,B} in conf/: A when a CUDA device is present (the fast defaults), else B (CPU: fp32, eager)."""
    import torch

    return on_gpu if torch.cuda.is_available() else otherwise


OmegaConf.register_new_resolver("gpu_or", _gpu_or, replace=True)

