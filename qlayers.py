"""The quantized UNet's building blocks: the integer weight format, the quantized layers, and S2's scale sets.

Everything that a quantized file holds is defined here, below checkpoint I/O, so that loading a quantized model
(ckpt.py) and sampling it (sample.py) never reach up into calibration (quant.py) or training (train.py). It is the
model half of quantization; quant.py is the method half (calibration data, AdaRound, BRECQ) and only makes what
this file describes.

- The format (WeightQuantizer): per output channel, w = scale * (w_int - zero_point) * in_scale, asymmetric codes in
  [0, 2^b - 1] stored as uint8, two 4-bit codes a byte; ranges from an Lp (p = 2.4) clipping search as Q-Diffusion
  (arXiv 2302.04304) chooses them. in_scale is TuneQDM's per-input-channel scale (None unless added); alpha and
  w_floor hold AdaRound's soft rounding (arXiv 2004.10568) while quant.py learns it.
- The layers (QuantConv2d, QuantLinear, QuantCrossAttention), swapped into a unet.py UNet by name, so the model
  itself knows nothing of quantization. A layer whose input is the decoder's [h, skip] has a quantizer for each
  part (Q-Diffusion's split shortcut). Training backpropagates into the scales without keeping any float weight
  (QuantWeightFn); inference dequantizes in cache-sized blocks on a CPU.
- S2 (ExpertUNet): one integer UNet and K scale sets, each owning an interval of the raw timestep t; PEQA
  (arXiv 2305.14152) trains only `scale_params`.

    python -c "import qlayers, unet; u = qlayers.swap_in(unet.UNet(unet.tiny()), 4, 8, 16); print(qlayers.bits_of(u))"
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import unet as unet_lib

ZETA, GAMMA = 1.1, -0.1                         # AdaRound's stretched sigmoid, so h reaches 0 and 1 exactly
P_NORM = 2.4                                    # Q-Diffusion's Lp norm for choosing ranges
RATIOS = [1 - 0.01 * i for i in range(80)]      # the clipping ratios searched, as Q-Diffusion does
PACKING = "halves"                              # how pack() lays out 4-bit codes, recorded in every file
BLOCK_BYTES = 6 * 2**20                         # on a CPU, convs dequantize blocks of output channels this size

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
def search_range(x, n_bits, lo=None, hi=None, block=2**17):
    """Per row of x (R, n): scale and zero_point of the range r * [lo, hi] (lo <= 0 <= hi, by default the row's min
    and max) whose fake quantization has the least sum |x - q(x)|^2.4, over the ratios r of RATIOS. Rows go in blocks
    of about `block` numbers that stay in cache across the ratios, with the error computed in place: on a CPU 1.8x
    the speed of whole-tensor temporaries (SD v1's 282 layers take minutes), and the same numbers."""
    qmax = 2**n_bits - 1
    lo = (x.amin(1, keepdim=True) if lo is None else lo).clamp(max=0)
    hi = (x.amax(1, keepdim=True) if hi is None else hi).clamp(min=0)
    scale, zero_point = torch.ones_like(lo), torch.zeros_like(lo)
    rows = max(1, block // x.shape[1])
    for a in range(0, x.shape[0], rows):
        xb, low, high = x[a:a + rows], lo[a:a + rows], hi[a:a + rows]
        best, err = torch.full_like(low, math.inf), torch.empty_like(xb)
        for r in RATIOS:
            s = ((high - low) * r / qmax).clamp(min=1e-8)
            z = torch.round(-low * r / s)                         # in [0, qmax] since lo <= 0 <= hi
            # err = |(clamp(round(x / s) + z, 0, qmax) - z) * s - x| ** P_NORM, step by step in one buffer
            torch.div(xb, s, out=err).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(xb).abs_().pow_(P_NORM)
            total = err.sum(1, keepdim=True)
            better = total < best
            best = total.where(better, best)
            scale[a:a + rows] = s.where(better, scale[a:a + rows])
            zero_point[a:a + rows] = z.where(better, zero_point[a:a + rows])
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


def swap_in(unet, wbits, abits, softmax_bits, splits=None, init=True, each=lambda layers: layers):
    """Replace, by name, each CrossAttention and then each Conv2d/Linear of `unet` by its quantized version, with RTN
    codes from the float weights if `init` (a skeleton otherwise). splits: {layer name: channels of h} of the layers
    whose input is [h, skip], by default unet.concat_splits from the config. `each` wraps the list of (name, layer)
    pairs, for a progress bar."""
    def put(name, module):
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, module)

    for name, m in list(unet.named_modules()):
        if type(m) is unet_lib.CrossAttention:
            put(name, QuantCrossAttention.from_float(m, abits, softmax_bits))
    splits = unet_lib.concat_splits(unet.config) if splits is None else splits
    named = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, m in each(named):
        put(name, QuantLayer.from_float(m, wbits, abits, splits.get(name), init))
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
# S2: several scale sets in one UNet


def expert_of(t, bounds):
    """Raw timesteps t (B,) -> the index of the expert that owns each."""
    return torch.bucketize(t, torch.tensor(bounds[1:-1], device=t.device), right=True)


class ExpertUNet(nn.Module):
    """S2: one frozen integer UNet and K scale sets. Each sample of a batch runs with the expert of its own t:
    samples are grouped by expert, each group runs with its expert's scales put in place, and the outputs return to
    batch order. An expert outside the batch is not in the graph, so it gets no gradient and AdamW leaves it alone."""

    def __init__(self, unet, experts, bounds):
        super().__init__()
        self.unet, self.experts, self.bounds = unet, experts, bounds   # experts: K x {scale name: Parameter}
        self.quantizers = {n: m for n, m in unet.named_modules() if isinstance(m, WeightQuantizer)}

    @property
    def config(self):
        return self.unet.config

    def use(self, k):
        for name, scale in self.experts[k].items():
            quantizer, attr = name.rsplit(".", 1)     # attr: scale or in_scale
            setattr(self.quantizers[quantizer], attr, scale)   # a Parameter re-registers in place of the last

    def forward(self, x, t, ctx):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        owner = expert_of(t, self.bounds)
        out, order = [], []
        for k in owner.unique().tolist():
            idx = torch.nonzero(owner == k).flatten()
            self.use(k)
            out.append(self.unet(x[idx], t[idx], ctx[idx]))
            order.append(idx)
        return torch.cat(out)[torch.argsort(torch.cat(order))]




def scale_params(unet):
    """{name: Parameter} of every WeightQuantizer's `scale` and, where it has one, `in_scale`: all that PEQA trains."""
    return {f"{n}.{a}": p for n, m in unet.named_modules() if isinstance(m, WeightQuantizer)
            for a, p in (("scale", m.scale), ("in_scale", m.in_scale)) if p is not None}


