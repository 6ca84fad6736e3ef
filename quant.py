"""Post-training quantization of the SD v1 UNet to integer weights: Q-Diffusion with AdaRound and BRECQ.

Q-Diffusion (Li et al., arXiv 2302.04304) calibrates on UNet inputs from the sampler's whole trajectory and quantizes
the two parts of a decoder layer's input [h, skip] separately. Rounding is learned with AdaRound (Nagel et al., arXiv
2004.10568) block by block as in BRECQ (Li et al., arXiv 2102.05426), then activation steps LSQ-style (Esser et al.,
arXiv 1902.08153).

1. `calibrate`: sample with the FP model (DDIM, CFG); keep the UNet inputs (x_t, t, ctx) of both halves at every
   `every`-th step.
2. `quantize_`: swap each Conv2d/Linear (and CrossAttention) by name for QuantConv2d/QuantLinear (QuantCrossAttention):
   integer weights per output channel, rounded to nearest in the range of least Lp error (RTN, the baseline; the
   format is WeightQuantizer's), and per-tensor fake quantization of each layer's input and of attention's q, k, v
   and probabilities.
3. `reconstruct`, unit by unit in forward order (ResBlocks and transformer blocks whole, other layers alone), inputs
   from the model quantized so far, targets from the FP model. Weights first, activations in float:
       loss = mean over positions of ||out_q - out_fp||^2 (sum over channels) + lambda sum(1 - |2 h(alpha) - 1|^beta)
   h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, lambda = 0.01, alpha
   initialised so that h(alpha) = frac(w / scale) (AdaRound eqs. 21-24). Over n iterations, with w = floor(0.2 n):
   no regularizer for i < w, then beta_i = 2 + 18 (1 - (i - w) / (n - w)). Then alpha >= 0 rounds up and the codes
   freeze; with activations quantized, the unit's activation ranges are set (min/max clipped by the Lp search) and
   their steps learned, weights hard.
4. `save_quantized` / `load_quantized` (and so `ckpt.load_sd`, `sample.py --ckpt`): one safetensors file.

    python quant.py --wbits 4 --abits 8 --out out/toy_w4a8.safetensors      # the toy world on a CPU (fast preset)
    python sample.py --ckpt out/toy_w4a8.safetensors --prompt "a red striped mug on the beach" --out mug.png
    python quant.py --ckpt v1-5-pruned-emaonly.safetensors --wbits 4 --abits 8 --device cuda --out sd15_w4a8.safetensors
"""
import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextModel

import ckpt
import sample
import unet as unet_lib
import vae as vae_lib
import world

ZETA, GAMMA = 1.1, -0.1                         # AdaRound's stretched sigmoid, so h reaches 0 and 1 exactly
P_NORM = 2.4                                    # Q-Diffusion's Lp norm for choosing ranges
RATIOS = [1 - 0.01 * i for i in range(80)]      # the clipping ratios searched, as Q-Diffusion does
PACKING = "halves"                              # how pack() lays out 4-bit codes, recorded in every file
BLOCK_BYTES = 6 * 2**20                         # on a CPU, convs dequantize blocks of output channels this size
PRESETS = {  # qdiffusion: Q-Diffusion's SD recipe with BRECQ's optimizer; fast: the toy world in ~2 CPU minutes
    "qdiffusion": dict(n_prompts=128, num_inference_steps=50, calib_every=2, iters=20000, act_iters=5000,
                       batch_size=32, lr=1e-3, act_lr=1e-3),
    "fast": dict(n_prompts=16, num_inference_steps=20, calib_every=2, iters=160, act_iters=40, batch_size=16,
                 lr=3e-2, act_lr=1e-3),
}
SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "a golden retriever puppy",
            "a snowy mountain village", "an astronaut", "a night market", "a glass teapot", "a medieval castle",
            "a hummingbird", "a steam locomotive", "a cozy reading nook", "a field of sunflowers", "a robot chef",
            "a sailboat"]
STYLES = ["at sunset, photograph", "as a watercolor painting", "digital art, highly detailed", "as a pencil sketch",
          "on a rainy street, cinematic lighting", "as an oil painting", "studio photo, soft light",
          "isometric 3d render"]


# --------------------------------------------------------------------------------------------------------------------
# integer codes and ranges


def pack(codes, n_bits):
    """(rows, k) codes -> uint8 (rows, h = ceil(k/2)) for n_bits <= 4: byte j holds code j in its low nibble and code
    j + h in its high one, so unpacking is two contiguous copies (a third faster on a CPU than adjacent pairs)."""
    codes = codes.to(torch.uint8)
    if n_bits > 4:
        return codes.contiguous()
    h = (codes.shape[1] + 1) // 2
    return codes[:, :h] | (F.pad(codes[:, h:], (0, codes.shape[1] % 2)) << 4)


def unpack(w_int, n_bits, k):
    """The inverse of pack: -> (rows, k) uint8 codes."""
    return w_int if n_bits > 4 else torch.cat([w_int & 15, w_int >> 4], dim=1)[:, :k]


def dequantize(w_int, zero_point, scale, in_scale, n_bits, shape, out=None):
    """scale * (codes - zero_point) * in_scale, flat (rows, k), for a weight of `shape`; a factor given as None is
    left out. Computed in place in `out` (a fresh tensor if None; unit stride along k) without autograd, for the
    inference and backward paths. For n_bits <= 4, codes - zero_point is taken in int8 before the float conversion:
    a byte operation instead of a pass over the float weight."""
    k = math.prod(shape[1:])
    out = torch.empty(len(w_int), k, dtype=zero_point.dtype, device=w_int.device) if out is None else out
    if n_bits <= 4:
        z, h = zero_point.to(torch.int8), w_int.shape[1]
        out[:, :h].copy_((w_int & 15).view(torch.int8).sub_(z))
        out[:, h:].copy_((w_int >> 4)[:, :k - h].view(torch.int8).sub_(z))
    else:
        out.copy_(w_int).sub_(zero_point)
    if scale is not None:
        out.mul_(scale)
    if in_scale is not None:
        out.unflatten(1, (shape[1], -1)).mul_(in_scale.reshape(1, shape[1], 1))
    return out


@torch.no_grad()
def search_range(x, n_bits, lo=None, hi=None):
    """Per row of x (R, n): scale and zero_point of the range r * [lo, hi] (lo <= 0 <= hi, by default the row's min
    and max) whose fake quantization has the least sum |x - q(x)|^2.4, over the ratios r of RATIOS."""
    qmax = 2**n_bits - 1
    lo = (x.amin(1, keepdim=True) if lo is None else lo).clamp(max=0)
    hi = (x.amax(1, keepdim=True) if hi is None else hi).clamp(min=0)
    best, scale, zero_point = torch.full_like(lo, math.inf), torch.ones_like(lo), torch.zeros_like(lo)
    for r in RATIOS:
        s = ((hi - lo) * r / qmax).clamp(min=1e-8)
        z = torch.round(-lo * r / s)                             # in [0, qmax] since lo <= 0 <= hi
        q = (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s
        err = (q - x).abs().pow(P_NORM).sum(1, keepdim=True)
        better = err < best
        best, scale, zero_point = err.where(better, best), s.where(better, scale), z.where(better, zero_point)
    return scale, zero_point


_scratch = {}


def scratch(numel, device, dtype):
    """One buffer per device for inference dequantization, reused by every layer: a fresh tensor per layer and forward
    costs more in CPU page faults than the dequantization itself. Not for two forwards at once."""
    buf = _scratch.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _scratch[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
    return buf[:numel]


# --------------------------------------------------------------------------------------------------------------------
# quantizers


class WeightQuantizer(nn.Module):
    """Integer weights w = scale * (w_int - zero_point) * in_scale for a float weight of `shape`. scale and zero_point
    per output channel, asymmetric: codes in [0, 2^b - 1], flattened per output channel and packed (uint8, two a byte
    for b <= 4). in_scale, per input channel ((1, in) or (1, in, 1, 1): TuneQDM's multi-channel scales), is None until
    add_in_scales. alpha (AdaRound's rounding variables) and w_floor are None but during AdaRound, when weight() is the
    soft weight; harden() rounds, freezes the codes and sets them back to None."""

    def __init__(self, shape, n_bits, device=None):
        super().__init__()
        self.shape, self.n_bits, self.k, self.qmax = tuple(shape), n_bits, math.prod(shape[1:]), 2**n_bits - 1
        packed = (self.k + 1) // 2 if n_bits <= 4 else self.k
        self.register_buffer("w_int", torch.zeros(shape[0], packed, dtype=torch.uint8, device=device))
        self.register_buffer("zero_point", torch.zeros(shape[0], 1, device=device))
        self.scale = nn.Parameter(torch.ones(shape[0], 1, device=device))
        self.register_parameter("in_scale", None)
        self.register_parameter("alpha", None)
        self.register_buffer("w_floor", None, persistent=False)

    def codes(self):
        return unpack(self.w_int, self.n_bits, self.k)

    def soft_rounding(self):
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)     # AdaRound eq. 23

    def weight(self):
        """The float weight, differentiable in scale, in_scale and (during AdaRound) alpha."""
        if self.alpha is not None:
            q = torch.clamp(self.w_floor + self.soft_rounding() + self.zero_point, 0, self.qmax)
        else:
            q = self.codes().to(self.scale.dtype)
        w = (self.scale * (q - self.zero_point)).view(self.shape)
        return w if self.in_scale is None else w * self.in_scale

    def set_codes(self, v):
        """Codes round(v) + zero_point, clamped to [0, 2^b - 1], into w_int."""
        self.w_int.copy_(pack(torch.clamp(torch.round(v) + self.zero_point, 0, self.qmax), self.n_bits))

    @torch.no_grad()
    def init_rtn(self, w):
        w = w.detach().flatten(1).to(self.scale)
        scale, zero_point = search_range(w, self.n_bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.set_codes(w / scale)

    @torch.no_grad()
    def start_adaround(self, w):
        v = w.detach().flatten(1).to(self.scale) / self.scale
        self.w_floor = v.floor()
        frac = v - self.w_floor                                   # h(alpha) = frac: the soft weight is w itself
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))

    @torch.no_grad()
    def harden(self):
        self.set_codes(self.w_floor + (self.alpha >= 0).to(self.w_floor))
        self.alpha = self.w_floor = None


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantization; `scale` learns through a straight-through round (LSQ), zero_point is
    fixed. `enabled` is False until init_activation_quantizers has set the range."""

    def __init__(self, n_bits, device=None):
        super().__init__()
        self.n_bits, self.enabled = n_bits, True
        self.scale = nn.Parameter(torch.ones((), device=device))
        self.register_buffer("zero_point", torch.zeros((), device=device))

    def forward(self, x):
        if not self.enabled:
            return x
        s, z = self.scale.to(x.dtype), self.zero_point.to(x.dtype)
        v = x / s
        v = v + (v.round() - v).detach()                         # round, with the gradient of the identity
        return (torch.clamp(v + z, 0, 2**self.n_bits - 1) - z) * s


def act_quantizer(n_bits, device=None):
    return ActQuantizer(n_bits, device) if n_bits < 32 else nn.Identity()


def op(x, w, bias, conv):
    """A layer's float operation: linear (conv None) or conv2d with conv = (stride, padding)."""
    return F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)


class QuantWeightFn(torch.autograd.Function):
    """op(x, w) + bias with w = scale * (codes - zero_point) * in_scale (in_scale may be None), differentiable in x,
    scale, in_scale and bias, saving only x and the uint8 codes: autograd through a dequantized weight would keep every
    layer's float weight (8x the 4-bit codes) alive until backward, so backward recomputes it. With c = codes -
    zero_point: dL/dscale = sum over the other dims of dL/dw * c * in_scale, dL/din_scale of dL/dw * c * scale."""

    @staticmethod
    def forward(ctx, x, w_int, scale, zero_point, in_scale, bias, n_bits, shape, conv):
        ctx.save_for_backward(x, w_int, scale, zero_point, in_scale)
        ctx.n_bits, ctx.shape, ctx.conv, ctx.bias_dtype = n_bits, shape, conv, None if bias is None else bias.dtype
        return op(x, dequantize(w_int, zero_point, scale, in_scale, n_bits, shape).view(shape).to(x.dtype), bias, conv)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_int, scale, zero_point, in_scale = ctx.saved_tensors
        shape, conv, needs = ctx.shape, ctx.conv, ctx.needs_input_grad
        c = dequantize(w_int, zero_point, None, None, ctx.n_bits, shape).view(shape)       # codes - zero_point
        grad_x = grad_scale = grad_in_scale = grad_bias = None
        if needs[0]:
            w = c * scale.view(-1, *[1] * (len(shape) - 1))
            w = (w if in_scale is None else w.mul_(in_scale)).to(grad_out.dtype)
            grad_x = grad_out @ w if conv is None else torch.nn.grad.conv2d_input(x.shape, w, grad_out, *conv)
            del w
        if needs[2] or needs[4]:
            grad_w = (grad_out.flatten(0, -2).T @ x.flatten(0, -2) if conv is None
                      else torch.nn.grad.conv2d_weight(x, shape, grad_out, *conv)).to(scale)
            g = grad_w.mul_(c).view(shape[0], shape[1], -1).sum(2)     # dL/dw * c over the kernel: (out, in)
            if needs[2]:
                grad_scale = (g if in_scale is None else g * in_scale.view(1, -1)).sum(1, keepdim=True)
            if needs[4]:
                grad_in_scale = (g * scale).sum(0).view(in_scale.shape)
        if ctx.bias_dtype is not None and needs[5]:
            grad_bias = (grad_out.flatten(0, -2).sum(0) if conv is None else grad_out.sum((0, 2, 3))).to(ctx.bias_dtype)
        return grad_x, None, grad_scale, None, grad_in_scale, grad_bias, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# quantized layers, swapped in by name


class QuantLayer(nn.Module):
    """A Conv2d (conv = (stride, padding)) or Linear (conv None) with integer weights: QuantConv2d, QuantLinear. A
    split layer (its input is [h, skip], `split` = channels of h) has a weight and an activation quantizer for each
    part: weight_quantizer(_skip), act_quantizer(_skip)."""

    def __init__(self, weight_shape, bias, wbits, abits, split=None, conv=None, device=None):
        super().__init__()
        out, c, rest = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
        self.weight_shape, self.wbits, self.abits = tuple(weight_shape), wbits, abits
        self.split, self.conv = split, conv
        self.parts = [split, c - split] if split else [c]          # input channels of each part
        self.dim = 1 if conv else -1                                 # the input's channel dimension
        self.weight_quantizer = WeightQuantizer((out, self.parts[0], *rest), wbits, device)
        self.act_quantizer = act_quantizer(abits, device)
        if split:
            self.weight_quantizer_skip = WeightQuantizer((out, self.parts[1], *rest), wbits, device)
            self.act_quantizer_skip = act_quantizer(abits, device)
        self.bias = nn.Parameter(torch.zeros(out, device=device)) if bias else None

    @staticmethod
    def from_float(layer, wbits, abits, split=None, init=True):
        """The QuantConv2d or QuantLinear for an nn.Conv2d or nn.Linear, with RTN codes of its weight if `init`."""
        conv = (tuple(layer.stride), tuple(layer.padding)) if isinstance(layer, nn.Conv2d) else None
        new = (QuantLinear if conv is None else QuantConv2d)(layer.weight.shape, layer.bias is not None, wbits, abits,
                                                             split, conv, layer.weight.device)
        return new.init_from(layer) if init else new

    @torch.no_grad()
    def init_from(self, layer):
        """RTN codes for the float layer's weight (Lp-searched ranges) and its bias."""
        for q, w in zip(self.weight_quantizers(), layer.weight.split(self.parts, dim=1)):
            q.init_rtn(w)
        if self.bias is not None:
            self.bias.copy_(layer.bias)
        return self

    def weight_quantizers(self):
        return [self.weight_quantizer, self.weight_quantizer_skip] if self.split else [self.weight_quantizer]

    def quantize_input(self, x):
        if not self.split:
            return self.act_quantizer(x)
        if isinstance(self.act_quantizer, nn.Identity):
            return x
        h, skip = x.split(self.parts, dim=self.dim)
        return torch.cat([self.act_quantizer(h), self.act_quantizer_skip(skip)], dim=self.dim)

    @torch.no_grad()
    def fast_weight(self, start=0, stop=None):
        """Output channels start:stop of the dequantized weight, in the shared scratch buffer: valid until the next
        call, one forward at a time."""
        stop = min(stop or self.weight_shape[0], self.weight_shape[0])
        qs, shape = self.weight_quantizers(), (stop - start, *self.weight_shape[1:])
        flat, col = scratch(math.prod(shape), qs[0].scale.device, qs[0].scale.dtype).view(shape[0], -1), 0
        for q in qs:
            dequantize(q.w_int[start:stop], q.zero_point[start:stop], q.scale[start:stop], q.in_scale, q.n_bits,
                       (shape[0], *q.shape[1:]), flat[:, col:col + q.k])
            col += q.k
        return flat.view(shape)

    def forward(self, x):
        x, qs = self.quantize_input(x), self.weight_quantizers()
        if qs[0].alpha is not None:                                  # AdaRound: autograd reaches alpha via weight()
            return op(x, torch.cat([q.weight() for q in qs], dim=1).to(x.dtype), self.bias, self.conv)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            if torch.is_autocast_enabled(x.device.type):   # mixed precision: x enters the Function in the autocast
                x = x.to(torch.get_autocast_dtype(x.device.type))   # dtype, so its backward sees one dtype
            outs = [QuantWeightFn.apply(xp, q.w_int, q.scale, q.zero_point, q.in_scale, self.bias if i == 0 else None,
                                        q.n_bits, q.shape, self.conv)   # training: the lean Function, once per part
                    for i, (xp, q) in enumerate(zip(x.split(self.parts, dim=self.dim), qs))]
            return sum(outs[1:], outs[0])
        # inference: no float weight is kept. On a CPU a conv takes its weight in blocks of output channels that stay
        # in cache between dequantization and conv; a whole weight would go out to memory and back (bench_quant.py)
        n, step = self.weight_shape[0], self.weight_shape[0]
        if self.conv is not None and x.device.type == "cpu":
            step = max(64, BLOCK_BYTES // (qs[0].scale.element_size() * math.prod(self.weight_shape[1:])) // 64 * 64)
        outs = [op(x, self.fast_weight(a, a + step).to(x.dtype), None if self.bias is None else self.bias[a:a + step],
                   self.conv) for a in range(0, n, step)]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class QuantConv2d(QuantLayer):
    """nn.Conv2d with integer weights (made by QuantLayer.from_float)."""


class QuantLinear(QuantLayer):
    """nn.Linear with integer weights (made by QuantLayer.from_float)."""


class QuantCrossAttention(unet_lib.CrossAttention):
    """CrossAttention whose attend() quantizes q, k, v (abits) and the attention probabilities (softmax_bits)."""

    def __init__(self, query_dim, context_dim, heads, head_dim, abits=32, softmax_bits=16, device=None):
        super().__init__(query_dim, context_dim, heads, head_dim)
        self.abits, self.softmax_bits = abits, softmax_bits
        self.q_quantizer, self.k_quantizer, self.v_quantizer, self.softmax_quantizer = (
            act_quantizer(b if abits < 32 else 32, device) for b in (abits, abits, abits, softmax_bits))

    @classmethod
    def from_float(cls, attn, abits, softmax_bits):
        with torch.device("meta"):                                   # its own projections are replaced just below
            new = cls(attn.to_q.in_features, attn.to_k.in_features, attn.heads, attn.to_q.out_features // attn.heads,
                      abits, softmax_bits, device=next(attn.parameters()).device)
        new.to_q, new.to_k, new.to_v, new.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        return new

    def attend(self, q, k, v):
        if self.abits >= 32:
            return super().attend(q, k, v)
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        probs = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return self.softmax_quantizer(probs) @ v


def swap_in(unet, wbits, abits, softmax_bits, splits=None, init=True):
    """Replace, by name, each CrossAttention and then each Conv2d/Linear of `unet` by its quantized version, with RTN
    codes from the float weights if `init` (a skeleton otherwise). splits: {layer name: channels of h} of the layers
    whose input is [h, skip], by default unet.concat_splits from the config."""
    def put(name, module):
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, module)

    for name, m in list(unet.named_modules()):
        if type(m) is unet_lib.CrossAttention:
            put(name, QuantCrossAttention.from_float(m, abits, softmax_bits))
    splits = unet_lib.concat_splits(unet.config) if splits is None else splits
    named = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, m in named if len(named) < 200 or not init else sample.progress(named, "quantize layers", unit="layers"):
        put(name, QuantLayer.from_float(m, wbits, abits, splits.get(name), init))
    return unet


def quantize_(unet, wbits, abits=32, softmax_bits=16, splits=None):
    """Swap every Conv2d/Linear (and CrossAttention) of `unet` in place for a quantized one, RTN-initialised.
    Activation quantizers stay disabled until init_activation_quantizers (or reconstruct) sets their ranges."""
    swap_in(unet, wbits, abits, softmax_bits, splits)
    for m in unet.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False
    return unet


def add_in_scales(module):
    """Give each weight quantizer in `module` per-input-channel scales, ones (TuneQDM's multi-channel scale update)."""
    for q in module.modules():
        if isinstance(q, WeightQuantizer) and q.in_scale is None:
            ones = torch.ones(1, q.shape[1], *[1] * (len(q.shape) - 2)).to(q.scale)
            q.in_scale = nn.Parameter(ones, requires_grad=q.scale.requires_grad)
    return module


def quant_skeleton(cfg, wbits, abits=32, softmax_bits=16, device="cpu", in_scales=False):
    """An empty quantized UNet, every tensor in its final shape (in_scale too if `in_scales`), to load a quantized
    state dict into: built on the meta device (no FP weights ever exist), then given uninitialised storage on
    `device` (unless that is "meta")."""
    with torch.device("meta"):
        unet = swap_in(unet_lib.UNet(cfg), wbits, abits, softmax_bits, init=False)
        if in_scales:
            add_in_scales(unet)
    return unet if str(device) == "meta" else unet.to_empty(device=device)


def bits_of(unet):
    """(wbits, abits, softmax_bits) of a quantized UNet."""
    layer = next(m for m in unet.modules() if isinstance(m, QuantLayer))
    attn = next((m for m in unet.modules() if isinstance(m, QuantCrossAttention)), None)
    return layer.wbits, layer.abits, 16 if attn is None else attn.softmax_bits


# --------------------------------------------------------------------------------------------------------------------
# calibration data


def default_prompts(sd, n, seed=0):
    """Captions of toy training scenes for the toy model, else a built-in list of generic prompts."""
    if sd.unet.config == unet_lib.toy():
        rng = random.Random(seed)
        return [world.caption(world.sample_scene(rng, "train"), rng) for _ in range(n)]
    return [f"{SUBJECTS[i % 16]} {STYLES[(i + i // 16) % 8]}" for i in range(n)]   # the first 128 are all pairs


@torch.no_grad()
def calibrate(sd, prompts, num_inference_steps=50, every=2, guidance_scale=7.5, seed=0, batch_size=16):
    """Time-step-aware calibration set: sample with the FP model (DDIM) and keep the UNet inputs, both CFG halves, at
    steps 0, every, 2 every, ... Returns dict(x=(N,C,h,w), t=(N,), ctx=(N,77,D)) on the CPU."""
    kept = []

    def record(i, t, x, ctx):
        if i % every == 0:
            kept.append((x.cpu(), t.cpu(), ctx.cpu()))

    param, cfg = next(sd.unet.parameters()), sd.unet.config
    generator = torch.Generator().manual_seed(seed)
    for start in sample.progress(range(0, len(prompts), batch_size), f"calibration: sampling {len(prompts)} prompts "
                                 f"in batches of {batch_size}", unit="batches"):
        chunk = list(prompts[start:start + batch_size])
        ctx, uncond = (sample.encode_prompts(sd, p).to(param) for p in (chunk, [""] * len(chunk)))
        shape = (len(chunk), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = sample.randn(shape, generator, param.device, param.dtype)
        sample.sample_latents(sd.unet, ctx, uncond, latents, num_inference_steps, guidance_scale, "ddim", 0.0,
                              generator, callback=record)
    return {key: torch.cat(v) for key, v in zip(("x", "t", "ctx"), zip(*kept))}


def save_calibration(path, data, meta=None):
    ckpt.atomic_save(data, path, {"format": "pt", "qdp.calibration": json.dumps(meta or {})})


def load_calibration(path):
    tensors, _ = ckpt.read_tensors(path)
    if any(k not in tensors for k in ("x", "t", "ctx")) or len({len(tensors[k]) for k in ("x", "t", "ctx")}) != 1:
        raise ckpt.CheckpointError(f"{path} is not calibration data from quant.py (x, t, ctx of one length); "
                                   f"write one with --save_calib")
    return {k: tensors[k] for k in ("x", "t", "ctx")}


# --------------------------------------------------------------------------------------------------------------------
# activation ranges and reconstruction


class _Stop(Exception):
    """Raised by a capture hook once the rest of the forward is not needed."""


def run_batches(module, tensors, batch_size, index=None):
    """module(*batch) over batches of the rows `index` (default: all) of the stacked `tensors`, moved to the module's
    device and float dtype; a forward that raises _Stop just ends there."""
    param = next(module.parameters())
    index = torch.arange(len(tensors[0])) if index is None else index
    for i in range(0, len(index), batch_size):
        try:
            module(*[a[index[i:i + batch_size]].to(param.device, param.dtype if a.is_floating_point() else a.dtype)
                     for a in tensors])
        except _Stop:
            pass


def hooked(modules, hook, run, pre=False):
    """run() with `hook` on each module (a forward pre-hook if `pre`), removing the hooks afterwards."""
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def init_activation_quantizers(module, inputs, batch_size=32, max_samples=1024, per_batch=4096, seed=0):
    """Set and enable the range of each activation quantizer in `module` from at most max_samples rows of its inputs
    (a calibration dict for a UNet, else a list of stacked positional inputs): the min and max over all batches,
    clipped by the Lp search on a random subsample of the values seen."""
    quantizers = [m for m in module.modules() if isinstance(m, ActQuantizer)]
    stats = {m: [math.inf, -math.inf, []] for m in quantizers}
    g = torch.Generator().manual_seed(seed)

    def observe(m, args):
        x, st = args[0].detach().flatten().float(), stats[m]
        st[0], st[1] = min(st[0], x.min().item()), max(st[1], x.max().item())
        st[2].append(x[torch.randint(x.numel(), (per_batch,), generator=g).to(x.device)].cpu())

    inputs = [inputs["x"], inputs["t"], inputs["ctx"]] if isinstance(inputs, dict) else inputs
    for m in quantizers:
        m.enabled = False
    index = torch.randperm(len(inputs[0]), generator=g)[:max_samples]
    hooked(quantizers, observe, lambda: run_batches(module, inputs, batch_size, index), pre=True)
    for m in quantizers:
        lo, hi, seen = stats[m]
        if seen:                                                 # else never reached by these inputs: stays disabled
            scale, zero_point = search_range(torch.cat(seen)[None], m.n_bits, torch.tensor([[lo]]),
                                             torch.tensor([[hi]]))
            m.scale.data.copy_(scale.view(()))
            m.zero_point.copy_(zero_point.view(()))
            m.enabled = True


def recon_units(qunet):
    """(name, module) of what is reconstructed together, in forward order: each ResBlock and BasicTransformerBlock
    whole (BRECQ's blocks), every other quantized layer alone."""
    units = []
    for name, m in qunet.named_modules():
        inside = units and name.startswith(units[-1][0] + ".")
        if not inside and isinstance(m, (unet_lib.ResBlock, unet_lib.BasicTransformerBlock, QuantLayer)):
            units.append((name, m))
    return units


@torch.no_grad()
def capture(model, names, data, batch_size, inputs=False):
    """Run `model` over calibration data [x, t, ctx]; record the output of each submodule in `names` (forward order),
    or with inputs=True its positional inputs, stopping each forward after the last. {name: [tensor, ...]} on CPU."""
    got, modules = {n: [] for n in names}, [model.get_submodule(n) for n in names]

    def record(module, args, out=None):
        got[names[modules.index(module)]].append([a.detach().cpu() for a in (args if inputs else (out,))])
        if module is modules[-1]:
            raise _Stop

    hooked(modules, record, lambda: run_batches(model, data, batch_size), pre=inputs)
    return {n: [torch.cat(parts) for parts in zip(*chunks)] for n, chunks in got.items()}


def recon_loss(out, target):
    """Squared error summed over channels (dim 1 of feature maps, the last dim of tokens), mean over the rest."""
    return (out - target).pow(2).sum(1 if out.ndim == 4 else -1).mean()


def rounding_loss(quantizers, i, iters, weight=0.01, b_range=(20, 2), warmup=0.2):
    """lambda * sum(1 - |2h - 1|^beta) at iteration i: off during the warm-up, then beta linear from b_range[0] to
    b_range[1] (AdaRound eq. 24; the exact schedule is in the module docstring)."""
    w = int(warmup * iters)
    if i < w:
        return 0.0
    beta = b_range[1] + (b_range[0] - b_range[1]) * (1 - (i - w) / (iters - w))
    return weight * sum((1 - (2 * q.soft_rounding() - 1).abs().pow(beta)).sum() for q in quantizers)


def reconstruct_unit(unit, inputs, target, params, iters, batch_size, lr, regularizer=None, cosine=False, seed=0):
    """Adam on `params` (or param groups) bringing unit(*inputs) to target on random minibatches; the last loss."""
    device = next(unit.parameters()).device
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if cosine else None
    g = torch.Generator().manual_seed(seed)
    for i in range(iters) if iters < 1000 else sample.progress(range(iters), "AdaRound iterations", inner=True):
        idx = torch.randint(len(target), (batch_size,), generator=g)
        loss = recon_loss(unit(*[a[idx].to(device) for a in inputs]), target[idx].to(device))
        opt.zero_grad(set_to_none=True)
        (loss if regularizer is None else loss + regularizer(i)).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return loss.item()


def reconstruct(qunet, fp_unet, calib, iters=20000, act_iters=5000, batch_size=32, lr=1e-3, act_lr=1e-3,
                weight=0.01, b_range=(20, 2), warmup=0.2, seed=0, max_samples=1024, target_budget=2**30):
    """AdaRound + BRECQ over recon_units in forward order. Each unit: learn its rounding (activations in float), harden
    it; then, with activations quantized, set its activation ranges and learn their steps (act_lr is relative to each
    step). Inputs come from qunet as quantized so far, targets from fp_unet, captured for all units in one pass when
    they fit in target_budget bytes, else again for each unit. Captured tensors are kept on the CPU; at most
    max_samples calibration rows are used (a fixed random subset), which bounds them on SD (~11 GB a unit)."""
    keep = torch.randperm(len(calib["t"]), generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
    data = [calib[k][keep] for k in ("x", "t", "ctx")]
    qunet.eval(), fp_unet.eval()
    flags = {p: p.requires_grad for p in qunet.parameters()}
    qunet.requires_grad_(False)
    units = recon_units(qunet)
    names = [n for n, _ in units]
    per_sample = sum(t.numel() * t.element_size() for ts in capture(fp_unet, names, [d[:1] for d in data], 1).values()
                     for t in ts)
    cached = capture(fp_unet, names, data, batch_size) if per_sample * len(data[0]) <= target_budget else {}
    try:
        bar = sample.progress(units, "AdaRound + BRECQ", unit="blocks")
        for j, (name, unit) in enumerate(bar):
            acts = [m for m in unit.modules() if isinstance(m, ActQuantizer)]
            if not (iters or acts):
                continue
            for m in acts:
                m.enabled = False
            x = capture(qunet, [name], data, batch_size, inputs=True)[name]
            y = (cached.get(name) or capture(fp_unet, [name], data, batch_size)[name])[0]
            log = []
            if iters:
                qs = []
                for n, layer in unit.named_modules():
                    if isinstance(layer, QuantLayer):
                        qs += layer.weight_quantizers()
                        fp = fp_unet.get_submodule(f"{name}.{n}" if n else name).weight.split(layer.parts, dim=1)
                        for q, w in zip(layer.weight_quantizers(), fp):
                            q.start_adaround(w)
                reg = lambda i: rounding_loss(qs, i, iters, weight, b_range, warmup)
                log.append(reconstruct_unit(unit, x, y, [q.alpha for q in qs], iters, batch_size, lr, reg,
                                            seed=seed + j))
                for q in qs:
                    q.harden()
            if acts:
                init_activation_quantizers(unit, x, batch_size, seed=seed + j)
                # relative rates: steps span ~1e-5 (16-bit probabilities) to ~1e-1, no absolute rate suits them all
                groups = [{"params": [m.scale.requires_grad_(True)], "lr": act_lr * m.scale.item()} for m in acts]
                if act_iters:
                    log.append(reconstruct_unit(unit, x, y, groups, act_iters, batch_size, act_lr, cosine=True,
                                                seed=seed + j))
                for m in acts:
                    m.scale.requires_grad_(False)
            bar.set_postfix_str(f"{name} loss " + " / ".join(f"{v:.3g}" for v in log))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return qunet


# --------------------------------------------------------------------------------------------------------------------
# the pipeline and files


def quantize_model(sd, wbits, abits=32, method="adaround", calib=None, softmax_bits=16, iters=20000, act_iters=5000,
                   batch_size=32, lr=1e-3, act_lr=1e-3, seed=0):
    """A StableDiffusion sharing sd's VAE and text encoder, with a quantized copy of its UNet: RTN, then AdaRound +
    BRECQ and learned activation steps (method="adaround"), or activation ranges only (method="rtn")."""
    if method not in ("adaround", "rtn"):
        raise ValueError(f"method must be 'adaround' or 'rtn', got {method!r}")
    if calib is None and (method == "adaround" or abits < 32):
        raise ValueError("AdaRound and activation quantization need calibration data; see calibrate()")
    qunet = quantize_(copy.deepcopy(sd.unet), wbits, abits, softmax_bits)
    torch.manual_seed(seed)
    if method == "adaround":
        reconstruct(qunet, sd.unet, calib, iters, act_iters, batch_size, lr, act_lr, seed=seed)
    elif abits < 32:
        init_activation_quantizers(qunet, calib, batch_size, seed=seed)
    return ckpt.StableDiffusion(qunet, sd.vae, sd.text_encoder, sd.tokenizer)


def save_quantized(sd_q, path, meta=None):
    """One safetensors file: the quantized UNet's state dict (with in_scale only where present), the VAE and text
    encoder as ckpt.save_compvis writes them, the model config ("qdp.config") and the quantization settings with
    `meta` ("qdp.quant")."""
    wbits, abits, softmax_bits = bits_of(sd_q.unet)
    parts = {"unet": sd_q.unet.state_dict(), "vae": sd_q.vae.state_dict(),
             "text_encoder": ckpt.canonical_text_keys(sd_q.text_encoder.state_dict())}
    tensors = {ckpt.PREFIX[name] + k: v for name, part in parts.items() for k, v in part.items()}
    info = json.dumps({"wbits": wbits, "abits": abits, "softmax_bits": softmax_bits, "packing": PACKING,
                       **(meta or {})})
    ckpt.atomic_save(tensors, path, {"format": "pt", "qdp.config": ckpt.config_json(sd_q), "qdp.quant": info,
                                     "qdp.unet_sha256": unet_digest(parts["unet"])})


def unet_digest(unet_sd):
    """sha256 of a quantized UNet's tensors (integer codes, scales and the float rest), in name order: stored at
    save and checked at load, since flipped bits in the codes would otherwise sample noise without an error."""
    h = hashlib.sha256()
    for k in sorted(unet_sd):
        v = unet_sd[k].detach().contiguous().cpu()
        h.update(k.encode() + str(v.dtype).encode() + str(tuple(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_quantized(want, got, bits, path):
    """One-line CheckpointErrors for a quantized UNet state dict that does not fit its skeleton or its bit widths."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [k for k in want if k in got and (got[k].shape != want[k].shape or
                                               (got[k].dtype == torch.uint8) != (want[k].dtype == torch.uint8))]
    if missing or unexpected or wrong:
        say = lambda what, ks: f"{len(ks)} {what}" + (f" (e.g. {ks[0]})" if ks else "")
        raise ckpt.CheckpointError(f"{path}: the quantized UNet does not match its config: {say('missing', missing)}, "
                                   f"{say('unexpected', unexpected)}, {say('of the wrong shape or dtype', wrong)}; "
                                   f"the file is incomplete, write it again with quant.py")
    for k, v in got.items():
        n = bits[0] if ".weight_quantizer" in k else bits[2] if "softmax_quantizer" in k else bits[1]
        if k.endswith(".w_int") and n not in (4, 8) and int(unpack(v, n, 2 * v.shape[1]).max()) > 2**n - 1:
            raise ckpt.CheckpointError(f"{path}: {k} holds codes above {2**n - 1}, out of range for {n} bits")
        if k.endswith(".zero_point") and not (bool((v == v.round()).all()) and 0 <= v.min() and v.max() <= 2**n - 1):
            raise ckpt.CheckpointError(f"{path}: {k} must hold integers in [0, {2**n - 1}] for {n} bits")
        if k.endswith("scale") and not bool((torch.isfinite(v) & ((v > 0) | k.endswith(".in_scale"))).all()):
            raise ckpt.CheckpointError(f"{path}: {k} holds scales that are not finite and positive")


def build_quantized(tensors, meta, path, device="cpu", dtype=torch.float32):
    """A StableDiffusion from the tensors and metadata of a file that save_quantized wrote (ckpt.load_sd calls it)."""
    try:
        info, configs = json.loads(meta["qdp.quant"]), json.loads(meta["qdp.config"])
        bits = (int(info["wbits"]), int(info["abits"]), int(info["softmax_bits"]))
        ucfg = ckpt.meta_cfg(unet_lib.UNetConfig(), configs["unet"])
    except (KeyError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable quantization metadata ({e}); write it again with "
                                   f"quant.py") from None
    if info.get("packing") != PACKING:
        raise ckpt.CheckpointError(f"{path} comes from an older quant.py (codes packed as {info.get('packing')!r}, "
                                   f"not {PACKING!r}); quantize the model again")
    parts = ckpt.split_compvis(tensors)
    if not parts["vae"] or not parts["text_encoder"]:
        raise ckpt.CheckpointError(f"{path} lacks the VAE or the text encoder; write it again with quant.py")
    if "qdp.unet_sha256" in meta and unet_digest(parts["unet"]) != meta["qdp.unet_sha256"]:
        raise ckpt.CheckpointError(f"{path}: the quantized UNet's tensors do not match the checksum stored with them "
                                   f"(the file was damaged or edited); quantize the model again or use a good copy")
    in_scales = any(k.endswith(".in_scale") for k in parts["unet"])
    qunet = quant_skeleton(ucfg, *bits, device="meta", in_scales=in_scales)
    check_quantized(qunet.state_dict(), parts["unet"], bits, path)
    ckpt.check_values(qunet.state_dict(), parts["unet"], "quantized UNet", path)
    cast = lambda sd: {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    qunet.load_state_dict(cast(parts["unet"]), strict=True, assign=True)
    with torch.device("meta"):
        vae = vae_lib.AutoencoderKL(ckpt.meta_cfg(vae_lib.VAEConfig.from_state_dict(parts["vae"]), configs.get("vae")))
    text_encoder = CLIPTextModel(ckpt.text_config(parts["text_encoder"], configs.get("text_encoder")))
    ckpt.fill(vae, cast(parts["vae"]), "VAE", path)
    ckpt.fill(text_encoder, ckpt.model_text_keys(cast(parts["text_encoder"]), text_encoder), "text encoder", path)
    text_encoder.to(device=device, dtype=dtype)
    return ckpt.StableDiffusion(qunet.eval(), vae.eval(), text_encoder.eval(), ckpt.load_tokenizer())


def load_quantized(path, device="cpu", dtype=torch.float32):
    tensors, meta = ckpt.read_tensors(path)
    if "qdp.quant" not in meta:
        raise ckpt.CheckpointError(f"{path} is not a quantized qdp file (no 'qdp.quant' metadata); make one with "
                                   f"`python quant.py --ckpt {path}`")
    return build_quantized(tensors, meta, path, device, dtype)


def sha256(path):
    """Of a file, or of a diffusers folder's files in name order."""
    path, h = Path(path), hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Quantize an SD v1 UNet to integer weights (Q-Diffusion).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = lambda k: f"unset: the preset's ({', '.join(f'{name} {v[k]:g}' for name, v in PRESETS.items())})"
    # model
    parser.add_argument("--ckpt", default=str(ckpt.TOY_CKPT), help="float SD v1 checkpoint (file or diffusers folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (cuda where available)")
    # quantization
    parser.add_argument("--wbits", type=int, choices=[4, 8], default=4, help="weight bits")
    parser.add_argument("--abits", type=int, choices=[8, 32], default=8, help="activation bits (32: float)")
    parser.add_argument("--softmax_bits", type=int, default=16, help="bits of the attention probabilities, 2..16")
    parser.add_argument("--method", choices=["adaround", "rtn"], default="adaround",
                        help="learned rounding (AdaRound + BRECQ) or round-to-nearest, the baseline")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults of the flags below: "
                        "qdiffusion (Q-Diffusion's SD recipe) or fast; unset: fast for the toy model, qdiffusion "
                        "for others")
    # calibration data
    parser.add_argument("--calib_prompts", default=None, help="text file, one prompt per line; unset: built-in prompts")
    parser.add_argument("--n_prompts", type=int, default=None, help=f"prompts to sample; {preset('n_prompts')}")
    parser.add_argument("--num_inference_steps", "--calib_steps", type=int, default=None,
                        help=f"DDIM steps to sample each prompt with; {preset('num_inference_steps')}")
    parser.add_argument("--calib_every", type=int, default=None,
                        help=f"keep the UNet inputs of every n-th step; {preset('calib_every')}")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance when sampling")
    parser.add_argument("--calib_data", default=None, help="reuse calibration data written by --save_calib "
                        "instead of sampling")
    parser.add_argument("--save_calib", default=None, help="write the calibration data to this .safetensors file")
    # reconstruction
    parser.add_argument("--iters", type=int, default=None,
                        help=f"AdaRound iterations per block or layer, 0 skips; {preset('iters')}")
    parser.add_argument("--act_iters", type=int, default=None,
                        help=f"activation step iterations per block or layer, 0 skips; {preset('act_iters')}")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"calibration samples per iteration; {preset('batch_size')}")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"Adam learning rate of the rounding variables; {preset('lr')}")
    parser.add_argument("--act_lr", type=float, default=None, help="Adam learning rate of the activation steps, "
                        f"relative to each step; {preset('act_lr')}")
    # run
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts, latents and minibatches")
    parser.add_argument("--out", default=None, help="output .safetensors file; "
                        "unset: out/<ckpt name>_w<wbits>a<abits>_<method>.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="let --out and --save_calib replace existing files")
    args = parser.parse_args(argv)

    given = lambda *flags: [f"--{f}" for f in flags if getattr(args, f) is not None]
    for flag, least in [("n_prompts", 1), ("num_inference_steps", 1), ("calib_every", 1), ("batch_size", 1),
                        ("iters", 0), ("act_iters", 0)]:
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            parser.error(f"--{flag} must be at least {least}" + (" (0 skips that stage)" if least == 0 else ""))
    for flag in given("lr", "act_lr"):
        if not 0 < getattr(args, flag[2:]) < math.inf:
            parser.error(f"{flag} must be positive and finite, e.g. 1e-3")
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance_scale must be a finite number, e.g. 7.5, got {args.guidance_scale}")
    if (args.num_inference_steps or 0) >= sample.NUM_TRAIN_TIMESTEPS:
        parser.error(f"--num_inference_steps must be in 1..{sample.NUM_TRAIN_TIMESTEPS - 1}, e.g. 50")
    if not 2 <= args.softmax_bits <= 16:
        parser.error("--softmax_bits must be in 2..16 (Q-Diffusion uses 16 on SD)")
    if args.method == "rtn" and given("iters", "act_iters", "lr", "act_lr"):
        parser.error(f"{', '.join(given('iters', 'act_iters', 'lr', 'act_lr'))} only apply to --method adaround")
    if args.calib_data and given("calib_prompts", "n_prompts", "num_inference_steps", "calib_every"):
        parser.error("--calib_data replaces sampling: drop it or drop "
                     + ", ".join(given("calib_prompts", "n_prompts", "num_inference_steps", "calib_every")))
    if args.method == "rtn" and args.abits == 32 and given("calib_prompts", "calib_data", "save_calib"):
        parser.error("round-to-nearest weights with float activations need no calibration data; drop "
                     + ", ".join(given("calib_prompts", "calib_data", "save_calib")))
    for flag in given("calib_prompts", "calib_data"):
        if not Path(getattr(args, flag[2:])).is_file():
            parser.error(f"{flag} {getattr(args, flag[2:])}: no such file")
    args.prompts = None
    if args.calib_prompts:
        args.prompts = [p.strip() for p in Path(args.calib_prompts).read_text().splitlines() if p.strip()]
        if not args.prompts:
            parser.error(f"--calib_prompts {args.calib_prompts} holds no prompt; write one prompt per line")
    args.out = args.out or f"out/{Path(args.ckpt).stem}_w{args.wbits}a{args.abits}_{args.method}.safetensors"
    for flag in given("out", "save_calib"):
        if Path(getattr(args, flag[2:])).suffix != ".safetensors":
            parser.error(f"{flag} must end in .safetensors, got {getattr(args, flag[2:])!r}")
    if Path(args.out).resolve() == Path(args.ckpt).resolve():
        parser.error("--out would overwrite --ckpt; choose another file name")
    inputs = [args.ckpt, args.calib_data, args.calib_prompts]
    try:                                    # before any work: nothing the user made is replaced without --overwrite
        ckpt.check_output(args.out, "--out", args.overwrite, inputs)
        if args.save_calib:
            ckpt.check_output(args.save_calib, "--save_calib", args.overwrite, inputs + [args.out])
    except ckpt.CheckpointError as e:
        parser.error(str(e))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    sample.pick_threads(args.device)
    try:
        sd = ckpt.load_sd(args.ckpt, device=args.device)
        if any(isinstance(m, QuantLayer) for m in sd.unet.modules()):
            raise ckpt.CheckpointError(f"{args.ckpt} is already quantized; pass the float checkpoint it came from")
        calib = load_calibration(args.calib_data) if args.calib_data else None
    except ckpt.CheckpointError as e:
        sys.exit(f"error: {e}")
    args.preset = args.preset or ("fast" if sd.unet.config == unet_lib.toy() else "qdiffusion")
    n_prompts = args.n_prompts or (len(args.prompts) if args.prompts else None)
    for k, v in PRESETS[args.preset].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.n_prompts = n_prompts or args.n_prompts
    t0 = time.perf_counter()
    if calib is None and (args.method == "adaround" or args.abits < 32):          # plain W-only RTN needs no data
        prompts = args.prompts or default_prompts(sd, args.n_prompts, args.seed)
        prompts = [prompts[i % len(prompts)] for i in range(args.n_prompts)]
        calib = calibrate(sd, prompts, args.num_inference_steps, args.calib_every, args.guidance_scale, args.seed)
        if args.save_calib:
            save_calibration(args.save_calib, calib, {k: getattr(args, k) for k in
                                                      ("n_prompts", "num_inference_steps", "calib_every", "seed")})
    t1 = time.perf_counter()
    sd_q = quantize_model(sd, args.wbits, args.abits, args.method, calib, args.softmax_bits, args.iters,
                          args.act_iters, args.batch_size, args.lr, args.act_lr, args.seed)
    t2 = time.perf_counter()
    sampling = ["n_prompts", "num_inference_steps", "calib_every", "guidance_scale"]
    used = ["method", "preset", "seed", "batch_size"] + (["calib_data"] if args.calib_data else sampling)
    used += ["iters", "act_iters", "lr", "act_lr"] if args.method == "adaround" else []
    meta = {**{k: getattr(args, k) for k in used}, "calib_samples": len(calib["t"]) if calib else 0,
            "base": Path(args.ckpt).name, "base_sha256": sha256(args.ckpt), "calib_seconds": round(t1 - t0, 1),
            "quant_seconds": round(t2 - t1, 1)}
    save_quantized(sd_q, args.out, meta)
    fp = sum(p.numel() for p in sd.unet.parameters()) * 4
    q = sum(v.numel() * v.element_size() for v in sd_q.unet.state_dict().values())
    print(f"wrote {args.out}: W{args.wbits}A{args.abits} {args.method}, {args.preset} preset, {meta['calib_samples']} "
          f"calibration samples; UNet {q / 2**20:.1f} MB vs {fp / 2**20:.1f} MB in FP32 ({q / fp:.3f}x); "
          f"calibration {t1 - t0:.0f} s, quantization {t2 - t1:.0f} s")


if __name__ == "__main__":
    import quant as module  # the importable module, not this __main__ copy: ckpt.load_sd builds quantized files with
    module.main()  # quant's QuantLayer, which a second copy's isinstance checks would not recognise
