"""Post-training quantization of the SD v1 UNet to integer weights: Q-Diffusion with AdaRound and BRECQ.

Q-Diffusion (Li et al., arXiv 2302.04304) calibrates on UNet inputs from the sampler's whole trajectory and quantizes
the two parts of a decoder layer's input [h, skip] separately. Rounding is learned with AdaRound (Nagel et al., arXiv
2004.10568) block by block as in BRECQ (Li et al., arXiv 2102.05426), then activation steps LSQ-style (Esser et al.,
arXiv 1902.08153).

1. `calibrate`: sample with the FP model (DDIM, CFG); keep the UNet inputs (x_t, t, ctx) of both halves at every
   `every`-th step.
2. `quantize_`: swap each Conv2d/Linear (and CrossAttention) by name for qlayers.py's QuantConv2d/QuantLinear
   (QuantCrossAttention): integer weights per output channel, rounded to nearest in the range of least Lp error (RTN,
   the baseline; the format is qlayers.WeightQuantizer's), and per-tensor fake quantization of each layer's input and
   of attention's q, k, v and probabilities.
3. `reconstruct`, unit by unit in forward order (ResBlocks and transformer blocks whole, other layers alone), inputs
   from the model quantized so far (its state carried from one top-level module to the next, so that each unit costs
   one module's forward, not a whole one), targets from the FP model. Weights first, activations in float:
       loss = mean over positions of ||out_q - out_fp||^2 (sum over channels) + lambda sum(1 - |2 h(alpha) - 1|^beta)
   h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, lambda = 0.01, alpha
   initialised so that h(alpha) = frac(w / scale) (AdaRound eqs. 21-24). Over n iterations, with w = floor(0.2 n):
   no regularizer for i < w, then beta_i = 2 + 18 (1 - (i - w) / (n - w)). Then alpha >= 0 rounds up and the codes
   freeze; with activations quantized, the unit's activation ranges are set (min/max clipped by the Lp search) and
   their steps learned, weights hard.
4. `ckpt.save_quantized` / `ckpt.load_quantized` (and so `ckpt.load_sd`, `sample.py --ckpt`): one safetensors file.

    python quant.py --wbits 4 --abits 8 --out out/toy_w4a8.safetensors      # the toy world on a CPU (fast preset)
    python sample.py --ckpt out/toy_w4a8.safetensors --prompt "a red striped mug on the beach" --out mug.png
    python quant.py --ckpt v1-5-pruned-emaonly.safetensors --wbits 4 --abits 8 --device cuda --out sd15_w4a8.safetensors
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import ckpt
import qlayers
import sample
import unet as unet_lib
from toyworld import world

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
    quantizers = [m for m in module.modules() if isinstance(m, qlayers.ActQuantizer)]
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
            scale, zero_point = qlayers.search_range(torch.cat(seen)[None], m.n_bits, torch.tensor([[lo]]),
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
        if not inside and isinstance(m, (unet_lib.ResBlock, unet_lib.BasicTransformerBlock, qlayers.QuantLayer)):
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


class Carry:
    """The calibration rows' state between top-level UNet modules (UNet.steps), kept on the CPU: the input of any
    unit is then one module's forward away instead of everything before it. `at(name)` first moves the state
    through the modules before the one that holds `name`, with the model as it is then (earlier units done), so the
    inputs are the same numbers a whole forward per unit gives (BRECQ's capture), batch by batch."""

    def __init__(self, model, data, batch_size):
        self.model, self.steps, self.batch_size = model, model.steps(), batch_size
        self.param = next(model.parameters())
        self.state, self.done = Carry.initial(data, self.param), 0

    @staticmethod
    def initial(data, param):
        """The state before the first module: [x, t, ctx], floats in the model's dtype (as run_batches casts them)."""
        x, t, ctx = (a.to(dtype=param.dtype) if a.is_floating_point() else a for a in data)
        return dict(x=x, t=t, ctx=ctx)

    @staticmethod
    def nbytes(model, data):
        """Bytes per calibration row of the largest state between two modules (a one-row forward)."""
        param = next(model.parameters())
        state, most = {k: a[:1].to(param.device) for k, a in Carry.initial(data, param).items()}, 0
        with torch.no_grad():
            for _, step in model.steps():
                state = step(state)
                most = max(most, sum(a.numel() * a.element_size() for v in state.values()
                                     for a in (v if isinstance(v, list) else [v])))
        return most

    def run(self, step):
        """step(state of one batch) over all rows, on the model's device; the outputs (or None where step raised
        _Stop) stay as they come, dtype included, so a resumed forward sees what an unbroken one does."""
        n, outs = len(self.state["x"]), []
        move = lambda a: a[i:i + self.batch_size].to(self.param.device)
        for i in range(0, n, self.batch_size):
            try:
                outs.append(step({k: [move(a) for a in v] if isinstance(v, list) else move(v)
                                  for k, v in self.state.items()}))
            except _Stop:
                outs.append(None)
        return outs

    @torch.no_grad()
    def at(self, name):
        """Positional inputs of submodule `name`, [tensor, ...] over all rows on the CPU."""
        k = next(i for i, (top, _) in enumerate(self.steps) if name == top or name.startswith(top + "."))
        cat = lambda parts: torch.cat([p.cpu() for p in parts])
        for _, step in self.steps[self.done:k]:
            outs = self.run(step)
            self.state = {key: [cat(p) for p in zip(*(o[key] for o in outs))] if isinstance(outs[0][key], list)
                          else cat([o[key] for o in outs]) for key in outs[0]}
        self.done, got = k, []
        module = self.model.get_submodule(name)

        def record(m, args):
            got.append([a.detach().cpu() for a in args])
            raise _Stop

        hooked([module], record, lambda: self.run(self.steps[k][1]), pre=True)
        return [torch.cat(parts) for parts in zip(*got)]


def recon_loss(out, target):
    """Squared error summed over channels (dim 1 of feature maps, the last dim of tokens), mean over the rest; in
    float32 whatever the outputs' dtype (under --mixed_precision they come in bf16 or fp16)."""
    return (out.float() - target.float()).pow(2).sum(1 if out.ndim == 4 else -1).mean()


def rounding_loss(quantizers, i, iters, weight=0.01, b_range=(20, 2), warmup=0.2):
    """lambda * sum(1 - |2h - 1|^beta) at iteration i: off during the warm-up, then beta linear from b_range[0] to
    b_range[1] (AdaRound eq. 24; the exact schedule is in the module docstring)."""
    w = int(warmup * iters)
    if i < w:
        return 0.0
    beta = b_range[1] + (b_range[0] - b_range[1]) * (1 - (i - w) / (iters - w))
    return weight * sum((1 - (2 * q.soft_rounding() - 1).abs().pow(beta)).sum() for q in quantizers)


def reconstruct_unit(unit, inputs, target, params, iters, batch_size, lr, regularizer=None, cosine=False, seed=0):
    """Adam on `params` (or param groups) bringing unit(*inputs) to target on random minibatches; the last loss.
    Under an fp16 autocast the loss is scaled (a GradScaler) so that small gradients survive; params stay float32."""
    device = next(unit.parameters()).device
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if cosine else None
    fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    g = torch.Generator().manual_seed(seed)
    for i in range(iters) if iters < 1000 else sample.progress(range(iters), "AdaRound iterations", inner=True):
        idx = torch.randint(len(target), (batch_size,), generator=g)
        loss = recon_loss(unit(*[a[idx].to(device) for a in inputs]), target[idx].to(device))
        opt.zero_grad(set_to_none=True)
        total = loss if regularizer is None else loss + regularizer(i)
        if scaler is None:
            total.backward()
            opt.step()
        else:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()
    return loss.item()


def reconstruct(qunet, fp_unet, calib, iters=20000, act_iters=5000, batch_size=32, lr=1e-3, act_lr=1e-3,
                weight=0.01, b_range=(20, 2), warmup=0.2, seed=0, max_samples=1024, target_budget=2**30,
                carry_budget=2**32):
    """AdaRound + BRECQ over recon_units in forward order. Each unit: learn its rounding (activations in float), harden
    it; then, with activations quantized, set its activation ranges and learn their steps (act_lr is relative to each
    step). Inputs come from qunet as quantized so far, targets from fp_unet, captured for all units in one pass when
    they fit in target_budget bytes, else again for each unit; the inputs come from a Carry (one top-level module's
    forward per unit) when its state fits in carry_budget bytes, else from a whole forward per unit. Captured tensors
    are kept on the CPU; at most
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
    carry = Carry(qunet, data, batch_size) if Carry.nbytes(qunet, data) * len(data[0]) <= carry_budget else None
    try:
        bar = sample.progress(units, "AdaRound + BRECQ", unit="blocks")
        for j, (name, unit) in enumerate(bar):
            acts = [m for m in unit.modules() if isinstance(m, qlayers.ActQuantizer)]
            if not (iters or acts):
                continue
            for m in acts:
                m.enabled = False
            x = carry.at(name) if carry else capture(qunet, [name], data, batch_size, inputs=True)[name]
            y = (cached.get(name) or capture(fp_unet, [name], data, batch_size)[name])[0]
            log = []
            if iters:
                qs = []
                for n, layer in unit.named_modules():
                    if isinstance(layer, qlayers.QuantLayer):
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


def quantize_(unet, wbits, abits=32, softmax_bits=16, splits=None):
    """Swap every Conv2d/Linear (and CrossAttention) of `unet` in place for a quantized one, RTN-initialised.
    Activation quantizers stay disabled until init_activation_quantizers (or reconstruct) sets their ranges."""
    bar = (lambda layers: layers if len(layers) < 200 else
           sample.progress(layers, "quantize layers", unit="layers"))      # SD v1: the Lp search takes minutes
    qlayers.swap_in(unet, wbits, abits, softmax_bits, splits, each=bar)
    for m in unet.modules():
        if isinstance(m, qlayers.ActQuantizer):
            m.enabled = False
    return unet


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


# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None, **flags):
    """The settings from the command line (argv), or from keyword arguments named as the flags
    (parse_args(wbits=4, abits=8, out="q.safetensors")): the same defaults and checks either way."""
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
    parser.add_argument("--mixed_precision", choices=sorted(sample.PRECISIONS), default="no", help="calibration "
                        "sampling and reconstruction forwards in bf16 or fp16 autocast (fp16 with loss scaling), "
                        "for speed and half the captured activations on a GPU; codes, roundings and steps stay float32")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts, latents and minibatches")
    parser.add_argument("--out", default=None, help="output .safetensors file; "
                        "unset: out/<ckpt name>_w<wbits>a<abits>_<method>.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="let --out and --save_calib replace existing files")
    args = parser.parse_args([*(argv or []), *sample.flags_argv(parser, flags)] if flags else argv)

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


def quantize(args=None, **flags):
    """The whole job, from parse_args' settings or from keyword arguments named as the flags: calibrate, quantize,
    write args.out; returns its path. A checkpoint that cannot be used raises ckpt.CheckpointError."""
    args = args if args is not None else parse_args(**flags)
    sd = ckpt.load_sd(args.ckpt, device=args.device)
    if any(isinstance(m, qlayers.QuantLayer) for m in sd.unet.modules()):
        raise ckpt.CheckpointError(f"{args.ckpt} is already quantized; pass the float checkpoint it came from")
    calib = load_calibration(args.calib_data) if args.calib_data else None
    args.preset = args.preset or ("fast" if sd.unet.config == unet_lib.toy() else "qdiffusion")
    n_prompts = args.n_prompts or (len(args.prompts) if args.prompts else None)
    for k, v in PRESETS[args.preset].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.n_prompts = n_prompts or args.n_prompts
    t0, precision = time.perf_counter(), sample.PRECISIONS[args.mixed_precision]
    if calib is None and (args.method == "adaround" or args.abits < 32):          # plain W-only RTN needs no data
        prompts = args.prompts or default_prompts(sd, args.n_prompts, args.seed)
        prompts = [prompts[i % len(prompts)] for i in range(args.n_prompts)]
        with sample.autocast(args.device, precision):
            calib = calibrate(sd, prompts, args.num_inference_steps, args.calib_every, args.guidance_scale, args.seed)
        calib = {k: v.float() if v.is_floating_point() else v for k, v in calib.items()}
        if args.save_calib:
            save_calibration(args.save_calib, calib, {k: getattr(args, k) for k in
                                                      ("n_prompts", "num_inference_steps", "calib_every", "seed")})
    t1 = time.perf_counter()
    with sample.autocast(args.device, precision):     # the forwards in bf16/fp16; codes, alphas and steps in float32
        sd_q = quantize_model(sd, args.wbits, args.abits, args.method, calib, args.softmax_bits, args.iters,
                              args.act_iters, args.batch_size, args.lr, args.act_lr, args.seed)
    t2 = time.perf_counter()
    sampling = ["n_prompts", "num_inference_steps", "calib_every", "guidance_scale"]
    used = ["method", "preset", "seed", "batch_size", "mixed_precision"] + (["calib_data"] if args.calib_data
                                                                          else sampling)
    used += ["iters", "act_iters", "lr", "act_lr"] if args.method == "adaround" else []
    meta = {**{k: getattr(args, k) for k in used}, "calib_samples": len(calib["t"]) if calib else 0,
            "base": Path(args.ckpt).name, "base_sha256": ckpt.sha256(args.ckpt), "calib_seconds": round(t1 - t0, 1),
            "quant_seconds": round(t2 - t1, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(args.device)}      # the float order: with another, AdaRound's choices differ (bench/)
    ckpt.save_quantized(sd_q, args.out, meta)
    fp = sum(p.numel() for p in sd.unet.parameters()) * 4
    q = sum(v.numel() * v.element_size() for v in sd_q.unet.state_dict().values())
    print(f"wrote {args.out}: W{args.wbits}A{args.abits} {args.method}, {args.preset} preset, {meta['calib_samples']} "
          f"calibration samples; UNet {q / 2**20:.1f} MB vs {fp / 2**20:.1f} MB in FP32 ({q / fp:.3f}x); "
          f"calibration {t1 - t0:.0f} s, quantization {t2 - t1:.0f} s")
    return Path(args.out)


def main(argv=None):
    args = parse_args(argv)
    sample.pick_threads(args.device)
    try:
        quantize(args)
    except ckpt.CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    import quant as module  # the importable module, not a __main__ copy whose classes the other modules would not know
    module.main()
