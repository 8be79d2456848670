"""The diffusion math in pure torch: no Lightning, no Hydra, no I/O."""
