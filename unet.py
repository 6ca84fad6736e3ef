"""The Stable Diffusion v1 UNet, written out by hand in one file.

The denoiser of latent diffusion (Rombach et al., arXiv 2112.10752): a UNet over 4-channel latents whose ResBlocks
take a sinusoidal timestep embedding (DDPM, arXiv 2006.11239) and whose SpatialTransformers attend to the CLIP text
context (cross-attention, GEGLU feed-forward from arXiv 2002.05202). Module names mirror the CompVis checkpoint, so
`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight` loads as it is; `diffusers_key_map`
gives the diffusers name of every tensor. Nothing here knows about quantization: quant.py swaps layers from outside.

    python unet.py                  # build the tiny preset, print its block shapes and parameter count
    python unet.py --preset sd_v1   # the same for the 860M-parameter SD v1 UNet
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320                      # width of level 0; level l is model_channels * channel_mult[l]
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2                        # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (0, 1, 2)           # levels that carry a SpatialTransformer after each ResBlock
    num_heads: int = 8                             # SD v1 fixes the head count; the head width follows the channels
    transformer_depth: int = 1
    context_dim: int = 768                         # CLIP ViT-L/14 text width
    norm_groups: int = 32
    sample_size: int = 64                          # latent side it was trained at: sets the default image size

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    @classmethod
    def from_state_dict(cls, sd):
        """Read the architecture off a CompVis-layout UNet state dict (keys without `model.diffusion_model.`).
        Shapes fix everything but `num_heads` (SD v1's 8 is assumed), `norm_groups` (32, or the largest power of
        two below it that divides every width, for narrow models) and `sample_size` (SD v1's 64)."""
        mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
        per_level, mult, attn = [0], [], []                    # ResBlocks counted per level
        for i in blocks[1:]:
            if f"input_blocks.{i}.0.op.weight" in sd:          # a Downsample closes the level
                per_level.append(0)
                continue
            if per_level[-1] == 0:                             # the level's first ResBlock sets its width
                mult.append(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc)
                if f"input_blocks.{i}.1.proj_in.weight" in sd:
                    attn.append(len(per_level) - 1)
            per_level[-1] += 1
        to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
        widths = [mc * m for m in mult]
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
        return cls(in_channels=cin, out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
                   channel_mult=tuple(mult), num_res_blocks=per_level[0], attention_levels=tuple(attn),
                   transformer_depth=depth, context_dim=to_k.shape[1], norm_groups=groups)


def sd_v1():
    return UNetConfig()


def tiny():
    """Small enough for a parity test in well under a second."""
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                      num_heads=2, context_dim=32, norm_groups=8)


def toy():
    """The toy world's UNet (toyworld/toy.py): 16x16x4 latents, a 64-wide toy CLIP context, attention at 8x8 and 4x4."""
    return UNetConfig(model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                      num_heads=4, context_dim=64, norm_groups=16, sample_size=16)


PRESETS = {"sd_v1": sd_v1, "toy": toy, "tiny": tiny}


# --------------------------------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim), cosines first as in CompVis (DDPM sec. 3.2)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between, and a residual path."""

    def __init__(self, in_ch, out_ch, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from x (B,N,C) to ctx (B,M,D); self-attention when ctx is None."""

    def __init__(self, query_dim, context_dim, heads, head_dim):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def attend(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v over heads (B,h,N,d); a separate method so a quantized subclass can
        replace just this step."""
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        split = lambda z: z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,N,h*d) -> (B,h,N,d)
        out = self.attend(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """A GELU-gated linear unit: one projection gives both the value and its gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, then feed-forward, each with a residual."""

    def __init__(self, dim, heads, head_dim, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, ctx):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treat each latent pixel as a token: norm, 1x1 conv in, transformer blocks, 1x1 conv out, residual."""

    def __init__(self, ch, heads, depth, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, ch // heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)   # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, ctx)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # `size` is the next skip's size, so odd latent sizes (e.g. 65x65) still line up when concatenated.
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(x, scale_factor=2.0)
        return self.conv(x)


class TimestepSequential(nn.Sequential):
    """One entry of input_blocks / output_blocks: hands each layer the input it needs."""

    def forward(self, x, emb, ctx, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, ctx)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------------------------
# the UNet


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        mc, ted, g = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        st = lambda ch: SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, g)
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        # down: conv_in, then per level `num_res_blocks` x (ResBlock [+ SpatialTransformer]) and a Downsample
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, ted, g)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(st(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_chs.append(ch)

        self.middle_block = TimestepSequential(ResBlock(ch, ch, ted, g), st(ch), ResBlock(ch, ch, ted, g))

        # up: per level `num_res_blocks + 1` x (ResBlock on [h, skip] [+ SpatialTransformer]), then an Upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * mc, ted, g)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(st(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, mc), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, ctx):
        """x (B,C,H,W) noisy latents, t (B,) or scalar integer timesteps, ctx (B,77,D) text context -> eps (B,C,H,W)."""
        state = dict(x=x, t=t, ctx=ctx)
        for _, step in self.steps():
            state = step(state)
        return state["x"]

    def steps(self):
        """The forward as [(name, step)], one step per top-level module in order (time_embed, input_blocks.i,
        middle_block, output_blocks.i, out): step(state) -> state moves a dict of x, the embedding `emb`, `ctx` and
        the skips `hs` one module on. Split so that a caller can resume the network from a saved state (quant.py's
        reconstruction keeps the state between blocks instead of rerunning everything before each one)."""
        def run(block, *a, **k):
            # gradient checkpointing (set by a training script): keep only each block's output for backward and
            # recompute the block's insides there, trading one extra forward for most of the activation memory
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return checkpoint(block, *a, use_reentrant=False, **k)
            return block(*a, **k)

        def embed(s):
            t = torch.as_tensor(s["t"], device=s["x"].device).expand(s["x"].shape[0])
            emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(s["x"].dtype))
            return dict(x=s["x"], emb=emb, ctx=s["ctx"], hs=[])

        def down(block):
            def step(s):
                x = run(block, s["x"], s["emb"], s["ctx"])
                return dict(s, x=x, hs=[*s["hs"], x])
            return step

        def up(block):
            def step(s):
                *hs, skip = s["hs"]
                x = run(block, torch.cat([s["x"], skip], dim=1), s["emb"], s["ctx"],
                        size=hs[-1].shape[-2:] if hs else None)
                return dict(s, x=x, hs=hs)
            return step

        return [("time_embed", embed), *((f"input_blocks.{i}", down(b)) for i, b in enumerate(self.input_blocks)),
                ("middle_block", lambda s: dict(s, x=run(self.middle_block, s["x"], s["emb"], s["ctx"]))),
                *((f"output_blocks.{i}", up(b)) for i, b in enumerate(self.output_blocks)),
                ("out", lambda s: dict(s, x=self.out(s["x"])))]


def concat_splits(cfg: UNetConfig):
    """{layer name: channels of h} for the decoder layers whose input is the concatenation [h, skip].

    These are the first conv of each output ResBlock and its 1x1 skip_connection; Q-Diffusion quantizes the two parts
    of their input separately because h and the skip have very different ranges."""
    splits, ch = {}, cfg.model_channels * cfg.channel_mult[-1]
    for i, level in enumerate(l for l in reversed(range(len(cfg.channel_mult))) for _ in range(cfg.num_res_blocks + 1)):
        splits[f"output_blocks.{i}.0.in_layers.2"] = splits[f"output_blocks.{i}.0.skip_connection"] = ch
        ch = cfg.model_channels * cfg.channel_mult[level]
    return splits


def diffusers_key_map(cfg: UNetConfig):
    """{our key: diffusers UNet2DConditionModel key} for every tensor: a table of block prefixes plus the ResBlock
    renames. Transformer internals share their names in both layouts."""
    n, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    prefixes = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
                "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
                "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
                "middle_block.2.": "mid_block.resnets.1."}
    for level in range(n):
        for j in range(nrb):
            i = 1 + level * (nrb + 1) + j
            prefixes[f"input_blocks.{i}.0."] = f"down_blocks.{level}.resnets.{j}."
            prefixes[f"input_blocks.{i}.1."] = f"down_blocks.{level}.attentions.{j}."
        prefixes[f"input_blocks.{1 + level * (nrb + 1) + nrb}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
    for k in range(n):                                           # diffusers counts up_blocks in execution order
        for j in range(nrb + 1):
            i = k * (nrb + 1) + j
            prefixes[f"output_blocks.{i}.0."] = f"up_blocks.{k}.resnets.{j}."
            prefixes[f"output_blocks.{i}.1."] = f"up_blocks.{k}.attentions.{j}."
        has_attn = (n - 1 - k) in cfg.attention_levels
        prefixes[f"output_blocks.{k * (nrb + 1) + nrb}.{2 if has_attn else 1}.conv."] = f"up_blocks.{k}.upsamplers.0.conv."
    resnet = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
              "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    out = {}
    for key in keys:
        ours = max((p for p in prefixes if key.startswith(p)), key=len)
        theirs, rest = prefixes[ours], key[len(ours):]
        if ".resnets." in theirs:
            r = next(r for r in resnet if rest.startswith(r))
            rest = resnet[r] + rest[len(r):]
        out[key] = theirs + rest
    return out


def diffusers_config(cfg: UNetConfig):
    """The kwargs that build the same network as `diffusers.UNet2DConditionModel` (and its unet/config.json)."""
    n = len(cfg.channel_mult)
    down = ["CrossAttnDownBlock2D" if l in cfg.attention_levels else "DownBlock2D" for l in range(n)]
    up = ["CrossAttnUpBlock2D" if l in cfg.attention_levels else "UpBlock2D" for l in reversed(range(n))]
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down,
                up_block_types=up, block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads,  # diffusers' SD v1 configs store the head *count* under this name
                transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.norm_groups,
                norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu", sample_size=cfg.sample_size)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="which UNetConfig to build")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]()
    with torch.device("meta") if args.preset == "sd_v1" else torch.device("cpu"):
        model = UNet(cfg)
    print(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if args.preset != "sd_v1":  # a real forward, with shapes through the blocks
        x, ctx = torch.randn(1, cfg.in_channels, 16, 16), torch.randn(1, 77, cfg.context_dim)
        hooks = [b.register_forward_hook(lambda m, i, o, n=name: print(f"{n:18s} {tuple(o.shape)}"))
                 for name, b in [(f"input_blocks.{i}", b) for i, b in enumerate(model.input_blocks)]
                 + [("middle_block", model.middle_block)]
                 + [(f"output_blocks.{i}", b) for i, b in enumerate(model.output_blocks)]]
        print("eps", tuple(model(x, torch.tensor([500]), ctx).shape))
