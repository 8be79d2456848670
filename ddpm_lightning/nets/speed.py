"""The U-Net as training and sampling call it: torch.compile, channels_last and bf16 autocast around a plain net."""

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class FastNet:
    """Calls ``net`` for training (``train``) and for sampling (``sample``) with the speed settings.

    ``compile``: torch.compile of the net for training (after ``compile_for_training``, which runs once the EMA
    callback has copied the module), and for sampling with static shapes (fullgraph; on a GPU mode reduce-overhead,
    CUDA graphs that each sampler step replays). If compilation fails: one warning and eager from then on.
    ``compile_backend``: torch.compile's backend, inductor (code generation: Triton on a GPU, C++ on a CPU) or
    aot_eager (Dynamo's graph capture and AOTAutograd's backward graph, run by eager kernels: what the two share,
    without the minutes of C++ compilation a CPU spends; the GPU rehearsal's). ``channels_last``: the NHWC layout of the weights and inputs. ``bf16_sampling``: bf16 autocast of the sampling
    calls, fp32 out. Not a module: the compiled graphs are not weights and are never checkpointed.
    """

    def __init__(
        self,
        net: nn.Module,
        compile: bool = False,
        channels_last: bool = False,
        bf16_sampling: bool = False,
        compile_backend: str = "inductor",
    ):
        self.net, self.compile, self.bf16_sampling, self.backend = net, compile, bf16_sampling, compile_backend
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=self.memory_format)
        self.compiled: dict = {}  # "train" / "sample": the compiled net, or the net itself after a failure

    def compile_for_training(self) -> None:
        if self.compile:
            self.compiled["train"] = torch.compile(self.net, backend=self.backend)

    def call(self, use: str, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        net = self.compiled.get(use, self.net)
        try:
            return net(x_t, t, y)
        except Exception as e:
            if net is self.net:
                raise
            first = str(e).splitlines()[0][:120]
            log.warning(f"torch.compile of the U-Net failed ({type(e).__name__}: {first}); running it eagerly")
            self.compiled[use] = self.net
            return self.net(x_t, t, y)

    def train(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.call("train", x_t, t, y)

    def sample(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta as the samplers call it: every call has the same shapes, so the net is compiled once; the output
        is used before the next call reuses its memory (CUDA graphs). fp32 out, also under bf16."""
        if self.compile and "sample" not in self.compiled:
            mode = "reduce-overhead" if x_t.device.type == "cuda" and self.backend == "inductor" else None
            self.compiled["sample"] = torch.compile(
                self.net, backend=self.backend, mode=mode, fullgraph=True, dynamic=False
            )
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.bf16_sampling):
            return self.call("sample", x_t, t, y).float()
