"""The paper's U-Net (section IV; after Outlier's "Diffusion Models PyTorch Implementation"), pure torch.

At the default width (64) the encoder goes 64-128-256-256, the bottleneck 256-512-512-256 and the decoder
back to 64 channels: about 23.3M parameters. ``width`` scales every channel count for tiny test nets.
The paper puts self-attention after each of the six down/up blocks, at 16, 8, 4 (down) and 8, 16, 32 (up) for
32x32 images; ``attention`` keeps it only at the named resolutions (DDPM's CIFAR-10 net: 16 only; ADM: 16 and 8).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the step index t: [sin(t f_k), cos(t f_k)], f_k = 10000^(-2k/dim)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = t.float()[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def attention_resolutions(image_size: int = 32) -> list[int]:
    """The resolutions at which the U-Net's blocks work, and so where ``attention`` may put self-attention."""
    return [image_size // 2**k for k in range(4)]


class DoubleConv(nn.Module):
    """3x3 conv, GroupNorm, GELU, 3x3 conv, GroupNorm; the residual variant adds the input and applies GELU."""

    def __init__(self, c_in: int, c_out: int, c_mid: int | None = None, residual: bool = False, dropout: float = 0.0):
        super().__init__()
        c_mid = c_mid or c_out
        self.residual = residual
        self.double_conv = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False),
            nn.GroupNorm(1, c_mid),
            nn.GELU(),
            *(
                [nn.Dropout(dropout)] if dropout else []
            ),  # between the convs of the residual blocks, as DDPM's ResnetBlock
            nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(1, c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.double_conv(x)) if self.residual else self.double_conv(x)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, then a pre-norm feed-forward block."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ff = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(self.norm(h)).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        h = h + self.proj(a)
        h = h + self.ff(h)
        return h.transpose(1, 2).reshape(B, C, H, W)


class Down(nn.Module):
    """Max-pool, a residual DoubleConv, a DoubleConv, plus a SiLU-Linear projection of the embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Sequential(
            nn.MaxPool2d(2), DoubleConv(c_in, c_in, residual=True, dropout=dropout), DoubleConv(c_in, c_out)
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.emb(emb)[:, :, None, None]


class Up(nn.Module):
    """Bilinear x2 upsampling, concatenation with the skip, two DoubleConvs, plus the embedding projection."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(c_in, c_in, residual=True, dropout=dropout), DoubleConv(c_in, c_out, c_in // 2)
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([skip, self.up(x)], dim=1))
        return x + self.emb(emb)[:, :, None, None]


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]). With ``num_classes`` set the net is conditional: a learned class embedding,
    with one extra "null" class at index ``num_classes``, is added to the timestep embedding. ``attention``: the
    resolutions (of ``image_size`` inputs) whose blocks keep their self-attention; ``dropout``: in the residual blocks."""

    def __init__(
        self,
        width: int = 64,
        emb_dim: int = 256,
        num_classes: int | None = None,
        in_channels: int = 3,
        heads: int = 4,
        attention: tuple[int, ...] = (32, 16, 8, 4),
        image_size: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        unknown = set(attention) - set(attention_resolutions(image_size))
        if unknown:
            raise ValueError(
                f"attention at {sorted(unknown)}: the U-Net's blocks of {image_size}x{image_size} images work at "
                f"{attention_resolutions(image_size)}"
            )

        def sa(channels: int, resolution: int) -> nn.Module:
            return SelfAttention(channels, heads) if resolution in attention else nn.Identity()

        r = image_size
        self.inc = DoubleConv(in_channels, c1)
        self.down1, self.sa1 = Down(c1, c2, emb_dim, dropout), sa(c2, r // 2)
        self.down2, self.sa2 = Down(c2, c3, emb_dim, dropout), sa(c3, r // 4)
        self.down3, self.sa3 = Down(c3, c3, emb_dim, dropout), sa(c3, r // 8)
        self.bot = nn.Sequential(DoubleConv(c3, 2 * c3), DoubleConv(2 * c3, 2 * c3), DoubleConv(2 * c3, c3))
        self.up1, self.sa4 = Up(2 * c3, c2, emb_dim, dropout), sa(c2, r // 4)
        self.up2, self.sa5 = Up(2 * c2, c1, emb_dim, dropout), sa(c1, r // 2)
        self.up3, self.sa6 = Up(2 * c1, c1, emb_dim, dropout), sa(c1, r)
        self.outc = nn.Conv2d(c1, in_channels, 1)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t, self.emb_dim)
        if self.label_emb is not None:
            if y is None:
                raise ValueError("the conditional U-Net needs labels y (use the null class for unconditional)")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("the unconditional U-Net takes no labels")
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.bot(self.sa3(self.down3(x3, emb)))
        x = self.sa4(self.up1(x4, x3, emb))
        x = self.sa5(self.up2(x, x2, emb))
        x = self.sa6(self.up3(x, x1, emb))
        return self.outc(x)
