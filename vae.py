"""The Stable Diffusion v1 autoencoder (the KL-regularised "first stage"), written out by hand in one file.

Latent diffusion (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752)
runs the diffusion process on the latents of this autoencoder: the encoder maps an image in [-1, 1] (B,3,H,W) to the
mean and log-variance of a diagonal Gaussian over latents (B,4,H/8,W/8), and the decoder maps latents back to pixels.
SD multiplies the latents by `scale_factor` so that they have roughly unit variance before the UNet sees them.
Module names mirror the CompVis checkpoint (keys without `first_stage_model.`), so `encoder.down.0.block.0.conv1.weight`
loads as it is; `diffusers_key_map` gives the diffusers name of every tensor.

    python vae.py                  # build the tiny preset, encode a random image, print the latent shape
    python vae.py --preset sd_v1   # the same for the 84M-parameter SD v1 autoencoder on a 256x256 image
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128                                  # width of level 0; level l is ch * ch_mult[l]
    ch_mult: tuple = (1, 2, 4, 4)                  # one entry per resolution level: downsampling is 2**(n-1)
    num_res_blocks: int = 2                        # ResBlocks per encoder level (one more per decoder level)
    z_channels: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215                  # SD's latent scale: the UNet sees scale_factor * z

    @classmethod
    def from_state_dict(cls, sd):
        """Read the architecture off a CompVis-layout VAE state dict (keys without `first_stage_model.`).
        Shapes fix everything but `scale_factor` (left at SD v1's value) and `norm_groups`, which no tensor shape
        records: it is 32, or for narrow models the largest of 16, 8, 4, 2, 1 that divides every level's width."""
        ch, cin = sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        n_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
        return cls(in_channels=cin, ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=n_blocks,
                   z_channels=sd["post_quant_conv.weight"].shape[0], norm_groups=groups)


def sd_v1():
    return VAEConfig()


def tiny():
    """Small enough for a parity test in well under a second. Widths 24 and 48 make from_state_dict infer 8 groups,
    and groups of 3 and 6 channels let a parity test catch a wrong grouping."""
    return VAEConfig(ch=24, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)


def toy():
    """The toy world's autoencoder (toyworld/toy.py): 64x64 images to 16x16x4 latents. Its latent scale is measured
    on the world's images after training and stored in the checkpoint, as SD's 0.18215 was measured on its data."""
    return VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8)


PRESETS = {"sd_v1": sd_v1, "toy": toy, "tiny": tiny}


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def group_norm(ch, groups):
    # every norm of the SD autoencoder uses eps=1e-6, not PyTorch's default 1e-5
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path; a 1x1 conv matches the widths when they change."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as the projections (as in CompVis)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)                                            # softmax(qk^T/sqrt(C))v
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # CompVis pads right and bottom only, so the 3x3 stride-2 windows start at pixel 0 (padding=1 would shift them)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(in_ch, out_ch, n_blocks, groups, **resample):
    """One resolution level as CompVis stores it: a bare container holding `block` (the ResBlocks) and one resampler
    passed by its checkpoint name, `downsample=` or `upsample=` (an nn.Identity, which has no weights, where a level has
    none)."""
    container = nn.Module()
    container.block = nn.ModuleList(ResBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n_blocks))
    for name, layer in resample.items():
        container.add_module(name, layer)
    return container


class Mid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.block_1, self.attn_1 = ResBlock(ch, ch, groups), AttnBlock(ch, groups)
        self.block_2 = ResBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


# --------------------------------------------------------------------------------------------------------------------
# the autoencoder


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g, n = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            level(widths[i - 1] if i else cfg.ch, widths[i], cfg.num_res_blocks, g,
                  downsample=Downsample(widths[i]) if i < n - 1 else nn.Identity()) for i in range(n))
        self.mid = Mid(widths[-1], g)
        self.norm_out = group_norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for lvl in self.down:
            for block in lvl.block:
                x = block(x)
            x = lvl.downsample(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g, n = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        # up.{i} is resolution level i, as in CompVis: up.0 is the full-resolution level and runs last
        self.up = nn.ModuleList(
            level(widths[min(i + 1, n - 1)], widths[i], cfg.num_res_blocks + 1, g,
                  upsample=Upsample(widths[i]) if i > 0 else nn.Identity()) for i in range(n))
        self.norm_out = group_norm(widths[0], g)
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for block in lvl.block:
                x = block(x)
            x = lvl.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """x (B,C,H,W) in [-1, 1] -> mean, logvar (B,z,H/f,W/f) of the posterior, f = 2**(len(ch_mult)-1)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as CompVis: exp(0.5 * logvar) neither overflows nor vanishes

    def decode(self, z):
        """Unscaled latents z (B,z,h,w) -> image (B,C,f*h,f*w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x, generator=None, sample=True):
        """Image in [-1, 1] -> the latents the UNet is trained on: a posterior sample (its mean if not `sample`),
        times `scale_factor`."""
        mean, logvar = self.encode(x)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * mean

    def decode_latents(self, latents):
        """Inverse of encode_latents: undo the scale, then decode."""
        return self.decode(latents / self.config.scale_factor)


def diffusers_key_map(cfg: VAEConfig):
    """{our key: diffusers AutoencoderKL key} for every tensor: a table of block prefixes plus the few leaf renames.

    diffusers numbers its decoder `up_blocks` in execution order, so its up_blocks.k is our up.{n-1-k}. It also keeps
    the mid-attention q/k/v/out as Linear weights (C,C) where CompVis has 1x1 convs (C,C,1,1): this map only pairs
    names, and the loader reshapes a tensor when its shape differs from ours only by trailing 1x1 dimensions."""
    n = len(cfg.ch_mult)
    prefixes = {"encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out."}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        prefixes[f"{part}.mid.attn_1."] = f"{part}.mid_block.attentions.0."
        prefixes[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
    for i in range(n):
        prefixes[f"encoder.down.{i}.block."] = f"encoder.down_blocks.{i}.resnets."
        prefixes[f"encoder.down.{i}.downsample."] = f"encoder.down_blocks.{i}.downsamplers.0."
        prefixes[f"decoder.up.{i}.block."] = f"decoder.up_blocks.{n - 1 - i}.resnets."
        prefixes[f"decoder.up.{i}.upsample."] = f"decoder.up_blocks.{n - 1 - i}.upsamplers.0."
    leaves = {"nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
              "proj_out": "to_out.0"}  # `norm` alone is only the attention's norm; ResBlocks have norm1 and norm2
    with torch.device("meta"):
        keys = list(AutoencoderKL(cfg).state_dict())
    out = {}
    for key in keys:
        ours = next((p for p in prefixes if key.startswith(p)), None)
        name = prefixes[ours] + key[len(ours):] if ours else key  # conv_in, conv_out, quant_conv keep their names
        module, param = name.rsplit(".", 1)
        parent, _, leaf = module.rpartition(".")
        out[key] = f"{parent}.{leaves[leaf]}.{param}" if leaf in leaves else f"{module}.{param}"
    return out


def diffusers_config(cfg: VAEConfig, sample_size=512):
    """The kwargs that build the same network as `diffusers.AutoencoderKL` (and its vae/config.json). diffusers'
    first level takes conv_in's output at its own width, so it can only express ch_mult[0] == 1, as in SD."""
    if cfg.ch_mult[0] != 1:
        raise ValueError(f"diffusers' AutoencoderKL needs ch_mult[0] == 1, got ch_mult={cfg.ch_mult}")
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                layers_per_block=cfg.num_res_blocks, act_fn="silu", latent_channels=cfg.z_channels,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor, sample_size=sample_size)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="which VAEConfig to build")
    parser.add_argument("--size", type=int, default=None, help="side of the test image in pixels; unset: 256 for "
                        "sd_v1, 64 otherwise")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]()
    model = AutoencoderKL(cfg).eval()
    size = args.size or (256 if args.preset == "sd_v1" else 64)
    print(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    with torch.no_grad():
        x = torch.rand(1, cfg.in_channels, size, size) * 2 - 1
        latents = model.encode_latents(x)
        print("image", tuple(x.shape), "-> latents", tuple(latents.shape), "-> image",
              tuple(model.decode_latents(latents).shape))
