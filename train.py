"""DreamBooth on a quantized SD v1 UNet by its quantization scales only: the baseline, S1 and S2 of the paper.

- DreamBooth (Ruiz et al., arXiv 2208.12242): a few photos of one subject, an instance prompt with a rare identifier
  ("a photo of sks dog"), and the class-prior preservation loss on images the model itself draws for the class prompt.
- PEQA (Kim et al., arXiv 2305.14152): the integer weights stay frozen; only the per-output-channel `scale` of every
  quantized layer trains (quant.py's WeightQuantizer), about 0.33M numbers for SD v1. `--multi_channel` (TuneQDM's
  ECCV version) also trains a scale per input channel of every layer, `in_scale`.
- Ryu et al., arXiv 2401.04339 (TuneQDM at ECCV): S1 (selective) draws t only from a "content" interval (fixed,
  or chosen per subject from its photos: `--t_range auto`, the fifth of t where the prompt sways the prediction most,
  as ZOODiP, Seo et al., arXiv 2503.14868, picks its timesteps); S2 (specialized) keeps K scale sets, experts, each
  owning an interval of the raw timestep t in 0..999, so a training sample updates the expert of its t and sampling
  switches experts as t falls.
`--method full` is the full-precision DreamBooth reference (all UNet weights train, on an FP checkpoint).

    python quant.py --wbits 4 --abits 8 --out runs/q.safetensors        # the toy model, on a CPU
    python train.py --ckpt runs/q.safetensors --instance_data_dir assets/toy/dreambooth/mug_star \
        --instance_prompt "a photo of sks mug" --with_prior_preservation --class_prompt "a photo of a mug" \
        --class_data_dir runs/class/mug --n_experts 4 --output_dir runs/mug_star
    python sample.py --ckpt runs/q.safetensors --scales runs/mug_star/personalized.safetensors \
        --prompt "a photo of sks mug on the beach" --num_images_per_prompt 4 --out mug.png
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

try:
    import fcntl                                      # POSIX; on Windows runs go unlocked
except ImportError:
    fcntl = None

import ckpt
import qlayers
import quant
import sample
import unet as unet_lib

OUT_FILE, STATE_FILE = "personalized.safetensors", "state.safetensors"
# defaults of the paper's official scripts (SD v1.4, 512 px, batch 1); the toy model's learning rates were measured
# here with prior preservation (bench/sweep_toy_personalize.py on 3 subjects: the README's PEQA trade-off table)
REAL_DEFAULTS = dict(learning_rate=3e-6, max_train_steps=400, full_learning_rate=5e-6)
TOY_DEFAULTS = dict(learning_rate=1e-3, max_train_steps=400, full_learning_rate=2e-4)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


# --------------------------------------------------------------------------------------------------------------------
# images from real folders


def load_images(files, resolution):
    """Image files -> (N,3,R,R) in [-1, 1]: the short side resized to R, then center-cropped; unreadable files are
    skipped with a warning, and a list with no usable image stops the run before any work."""
    out = []
    for im in map(ckpt.open_image, files):
        if im is None:
            continue
        s = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    if not out:
        where = Path(files[0]).parent if files else "the folder"
        raise TrainingError(f"no usable image in {where} (looked for {', '.join(ckpt.IMAGE_SUFFIXES)}); add photos")
    return torch.stack(out)


def generate_class_images(sd, class_prompt, folder, n, seed=0, batch_size=4, num_inference_steps=50,
                          guidance_scale=7.5, height=None, width=None):
    """The prior: `n` images of the class prompt drawn by the model itself into `folder` (DreamBooth sec. 3.3).
    Image i always comes from seed + i, so an interrupted generation resumes where it stopped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    note = folder / "class_prompt.txt"
    if note.is_file() and note.read_text().strip() != class_prompt:
        warnings.warn(f"{folder} holds images of {note.read_text().strip()!r}, not {class_prompt!r}; "
                      "use another --class_data_dir unless that is what you want", stacklevel=2)
    elif not note.is_file():
        note.write_text(class_prompt + "\n")
    todo = [i for i in range(n) if not (folder / f"{i:04d}.png").is_file()]
    # the folder is locked only while images are drawn: finished ones are only read, by any number of runs
    with folder_lock(folder, "--class_data_dir") if todo else contextlib.nullcontext():
        bar = sample.progress(todo, f"class images of {class_prompt!r}", total=n, unit="images", initial=n - len(todo))
        for i in bar if todo else []:     # one seed per image, so a batch size change or a resume keeps the images
            img = sample.generate(sd, class_prompt, seed=seed + i, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, height=height, width=width)[0]
            img.save(folder / f".{i:04d}.png")           # rename is atomic: a killed run leaves no half file
            (folder / f".{i:04d}.png").replace(folder / f"{i:04d}.png")
    return sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))[:n]


# --------------------------------------------------------------------------------------------------------------------
# timesteps: S1's content interval and S2's experts


def content_interval(lo_snr=1e-2, hi_snr=1.0):
    """The timesteps whose signal-to-noise ratio lies in [1e-2, 1]: the stage where P2 weighting (arXiv 2204.00227)
    finds diffusion models form an image's content, between coarse layout (lower SNR) and clean-up (higher).
    With SD v1's schedule this is t in [354, 933]; S1's default."""
    a = sample.alphas_cumprod()
    snr = a / (1 - a)
    t = torch.nonzero((snr >= lo_snr) & (snr <= hi_snr)).flatten()
    return int(t.min()), int(t.max())


AUTO_PARTS = 5   # --t_range auto scores each fifth of 0..999


def noised_set(mean, std, alphas_cumprod, g, draws=4, bins=10):
    """A fixed set of noised latents of some images: t spread evenly over `bins` bins of 0..999, each bin holding
    every image about `draws` times over (at least 8 examples per bin); `mean`/`std` are the VAE's latent moments."""
    width = sample.NUM_TRAIN_TIMESTEPS // bins
    per_bin = max(8, math.ceil(draws * len(mean) / bins))
    i = torch.arange(bins * per_bin)
    image, t = i % len(mean), (i // per_bin) * width + torch.randint(width, (len(i),), generator=g)
    x0 = mean[image] + std[image] * torch.randn(mean[image].shape, generator=g).to(mean.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    a = alphas_cumprod[t.to(x0.device)].view(-1, 1, 1, 1)
    return dict(x_t=a.sqrt() * x0 + (1 - a).sqrt() * noise, t=t.to(x0.device), noise=noise, bin=t // width, bins=bins)


@torch.no_grad()
def auto_interval(model, data, seed=0, batch_size=32):
    """--t_range auto, chosen per subject from its own photos before training starts: S1's interval is the fifth of
    0..999 where the prompt steers the untrained model's noise prediction the most, relative to how far off that
    prediction is. On a fixed set of the instance latents noised across all of t, for each tenth of t:
        influence = mean |eps(x_t, prompt) - eps(x_t, "")|^2 / mean |eps(x_t, prompt) - noise|^2   (the instance prompt)
    and a fifth scores the mean of its two tenths' influence. Where the text moves the prediction most is where a
    prompt's word (the identifier) can pull the sample toward the subject; ZOODiP (Seo et al., arXiv 2503.14868)
    draws its training timesteps where text embeddings matter most on the same grounds. Costs two forward passes
    over 80 noised latents or more (seconds on the toy, far less than a training step's budget on SD v1).
    Returns [lo, hi] (all of t, with a warning, when the prompt moves nothing) and one row of scores per fifth."""
    g = torch.Generator().manual_seed(seed + 1)            # the training run's own generator stays untouched
    s = noised_set(data["inst_mean"], data["inst_std"], data["alphas_cumprod"], g)
    moved, missed = [], []
    for i in range(0, len(s["t"]), batch_size):
        x, t = s["x_t"][i:i + batch_size], s["t"][i:i + batch_size]
        cond = model(x, t, data["inst_ctx"].expand(len(x), -1, -1)).float()
        free = model(x, t, data["null_ctx"].expand(len(x), -1, -1)).float()
        moved.append(((cond - free) ** 2).mean(dim=(1, 2, 3)).cpu())
        missed.append(((cond - s["noise"][i:i + batch_size].float()) ** 2).mean(dim=(1, 2, 3)).cpu())
    moved, missed, bin_of = torch.cat(moved), torch.cat(missed), s["bin"]     # bin: on the CPU, as t was drawn
    influence = torch.stack([moved[bin_of == k].mean() / missed[bin_of == k].mean() for k in range(s["bins"])])
    per_part, width = s["bins"] // AUTO_PARTS, sample.NUM_TRAIN_TIMESTEPS // AUTO_PARTS
    rows = [dict(t_range=(k * width, (k + 1) * width - 1),
                 score=influence[k * per_part:(k + 1) * per_part].mean().item()) for k in range(AUTO_PARTS)]
    best = max(rows, key=lambda r: r["score"])
    if not best["score"] > 0:
        warnings.warn("--t_range auto: the instance prompt does not change the model's prediction at any t; "
                      "training on all of 0..999", stacklevel=3)
        return [0, sample.NUM_TRAIN_TIMESTEPS - 1], rows
    return list(best["t_range"]), rows


def expert_bounds(n_experts, boundaries=None):
    """K+1 increasing bounds; expert k owns lo_k <= t < lo_{k+1}. Uniform bounds ceil(1000k/K) give expert
    floor(t*K/1000), the official code's rule."""
    inner = boundaries if boundaries is not None else \
        [math.ceil(k * sample.NUM_TRAIN_TIMESTEPS / n_experts) for k in range(1, n_experts)]
    return [0, *inner, sample.NUM_TRAIN_TIMESTEPS]


# --------------------------------------------------------------------------------------------------------------------
# what trains


def trainable(sd, method, n_experts, bounds, multi_channel=False):
    """Freeze the UNet, then open what `method` trains (with `multi_channel`, the per-input-channel scales too,
    created as ones). Returns the model to call and {name: Parameter}."""
    unet = sd.unet
    unet.requires_grad_(False)
    if method == "full":
        unet.requires_grad_(True)
        return unet, dict(unet.named_parameters())
    if multi_channel:
        qlayers.add_in_scales(unet)
    scales = qlayers.scale_params(unet)
    if not scales:
        raise TrainingError("--ckpt holds a full-precision UNet; quantize it first (python quant.py --ckpt ... "
                            "--out q.safetensors) or train it with --method full")
    if n_experts == 1:
        for p in scales.values():
            p.requires_grad_(True)
        return unet, scales
    experts = [{n: nn.Parameter(p.detach().clone()) for n, p in scales.items()} for _ in range(n_experts)]
    params = {f"expert.{k}.{n}": p for k, e in enumerate(experts) for n, p in e.items()}
    return qlayers.ExpertUNet(unet, experts, bounds), params


# --------------------------------------------------------------------------------------------------------------------
# the training step


@torch.no_grad()
def encode(sd, images, batch_size=8):
    """Images in [-1, 1] -> the mean and std of their VAE posteriors, times the latent scale factor; each training
    step draws a fresh posterior sample from them, as if it ran the encoder."""
    means, stds = [], []
    for x in images.split(batch_size):
        mean, logvar = sd.vae.encode(x.to(sd.device))
        means.append(mean * sd.vae.config.scale_factor)
        stds.append(torch.exp(0.5 * logvar) * sd.vae.config.scale_factor)
    return torch.cat(means), torch.cat(stds)


def make_batch(data, g, batch_size, t_range, prior_loss_weight):
    """`batch_size` instance and (with prior preservation) `batch_size` class examples in one batch, each with its
    own timestep drawn uniformly from t_range, noised by DDPM's forward process. `weight` makes the weighted sum of
    per-sample MSEs equal DreamBooth's loss (eq. 2): mean instance MSE + prior_loss_weight * mean class MSE."""
    dev = data["inst_mean"].device
    pick = lambda n: torch.randint(n, (batch_size,), generator=g).to(dev)
    i = pick(len(data["inst_mean"]))
    mean, std, ctx = data["inst_mean"][i], data["inst_std"][i], data["inst_ctx"].expand(batch_size, -1, -1)
    weight = torch.full((batch_size,), 1.0 / batch_size)
    if "class_mean" in data:
        c = pick(len(data["class_mean"]))
        mean, std = torch.cat([mean, data["class_mean"][c]]), torch.cat([std, data["class_std"][c]])
        ctx = torch.cat([ctx, data["class_ctx"].expand(batch_size, -1, -1)])
        weight = torch.cat([weight, torch.full((batch_size,), prior_loss_weight / batch_size)])
    randn = lambda: torch.randn(mean.shape, generator=g).to(dev)
    x0 = mean + std * randn()                                   # a fresh posterior sample of each image's latents
    t = torch.randint(t_range[0], t_range[1] + 1, (len(x0),), generator=g).to(dev)
    noise = randn()
    a = data["alphas_cumprod"][t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise                # q(x_t | x_0)
    return dict(x_t=x_t, t=t, ctx=ctx, noise=noise, weight=weight.to(dev), n_instance=batch_size)


def train_step(model, batch, precision=None, scaler=None):
    """Forward and backward of one batch; returns the loss and the per-sample MSEs (detached). `precision`
    (torch.bfloat16 or torch.float16) runs the UNet's forward under autocast, the loss and the trained tensors staying
    in float32; `scaler` (a GradScaler, for float16) scales the loss before backward.

    Under S2 the samples are grouped by the expert that owns their t, and each group runs its forward AND its
    backward with its expert's scales in place: gradient checkpointing recomputes blocks during backward, and must
    see the same scales as the forward did. Gradients of the groups add up to the whole batch's."""
    t, mse = batch["t"], torch.zeros(len(batch["t"]))
    if isinstance(model, qlayers.ExpertUNet):
        owner = qlayers.expert_of(t, model.bounds)
        groups = [(k, torch.nonzero(owner == k).flatten()) for k in owner.unique().tolist()]
    else:
        groups = [(None, torch.arange(len(t), device=t.device))]
    for k, idx in groups:
        unet = model if k is None else model.unet
        if k is not None:
            model.use(k)
        with sample.autocast(t.device, precision):
            eps = unet(batch["x_t"][idx], t[idx], batch["ctx"][idx])
        per_sample = F.mse_loss(eps.float(), batch["noise"][idx].float(), reduction="none").mean(dim=(1, 2, 3))
        group_loss = (batch["weight"][idx] * per_sample).sum()
        (group_loss if scaler is None else scaler.scale(group_loss)).backward()
        mse[idx.cpu()] = per_sample.detach().cpu()
    return (batch["weight"].cpu() * mse).sum(), mse


def optimizer_step(model, params, optimizer, batch, max_grad_norm, precision=None, scaler=None):
    """One AdamW step on a batch, with gradient clipping; a non-finite loss leaves the parameters as they were (and
    under float16 the GradScaler skips steps whose gradients overflowed). Returns train_step's loss and MSEs."""
    optimizer.zero_grad(set_to_none=True)    # None, not zero: AdamW skips experts that got no gradient
    loss, mse = train_step(model, batch, precision, scaler)
    if torch.isfinite(loss):
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], max_grad_norm)
        optimizer.step() if scaler is None else scaler.step(optimizer)
    if scaler is not None:
        scaler.update()
    return loss, mse


# --------------------------------------------------------------------------------------------------------------------
# checkpoints: only what trained, the run's config and the base model's digest


def save_state(path, params, optimizer, rng, step, config):
    """Everything a bitwise resume needs: the trained tensors, AdamW's moments and step counts, the RNG state.
    Parameters that are no longer finite are never saved, so the state on disk is always the last good one."""
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"the trained tensors hold NaN or inf at step {step} (e.g. {bad[0]}); "
                            + resume_advice(path))
    tensors = {"param." + n: p.detach().cpu() for n, p in params.items()}
    for n, p in params.items():
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"adam.{k}.{n}"] = v.detach().cpu()
    tensors["rng"] = rng.get_state()
    ckpt.atomic_save(tensors, path, {"qdp.train": json.dumps(config), "step": str(step)})


def resume_advice(state):
    """What to do after a NaN stop, naming a saved state only if one exists."""
    if state.is_file():
        with safe_open(str(state), framework="pt") as f:
            step = f.metadata()["step"]
        return (f"the last good state (step {step}) is {state}: rerun with --resume and a lower --learning_rate "
                "(a resume may lower it)")
    return "no state was saved yet: rerun with a lower --learning_rate"


def load_state(path, params, optimizer, rng, config):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["qdp.train"])
    # the one setting a resume may change besides the step count: a lower learning rate, the way out of a NaN stop
    lowered = config["learning_rate"] < saved.get("learning_rate", 0)
    changed = [k for k in config if k not in ("max_train_steps", "resume") and saved.get(k) != config[k]
               and not (k == "learning_rate" and lowered)]
    if changed:
        raise TrainingError(f"{path} was written by a run with other settings ({', '.join(changed)}); "
                            "resume with the same flags or use a fresh --output_dir")
    moments = {}
    for key, v in tensors.items():
        if key.startswith("adam."):
            _, kind, name = key.split(".", 2)       # adam.{step,exp_avg,exp_avg_sq}.{parameter name}
            moments.setdefault(name, {})[kind] = v
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors["param." + n])
            if n in moments:                        # an expert that never trained has no AdamW state yet
                optimizer.state[p] = {k: v.to(p.device) for k, v in moments[n].items()}
    rng.set_state(tensors["rng"])
    return int(meta["step"])


# --------------------------------------------------------------------------------------------------------------------
# the run


def prepare(sd, args):
    """Instance and class latents and the two text contexts, computed once; the VAE and text encoder then leave."""
    files = ckpt.image_files(args.instance_data_dir)
    if not files:
        raise TrainingError(f"{args.instance_data_dir} holds no image ({', '.join(ckpt.IMAGE_SUFFIXES)}); add 3-6 "
                            "photos")
    inst = load_images(files, args.resolution)
    data = {"alphas_cumprod": sample.alphas_cumprod().to(sd.device)}
    data["inst_mean"], data["inst_std"] = encode(sd, inst)
    data["inst_ctx"] = sample.encode_prompts(sd, [args.instance_prompt])
    if args.t_range == "auto":                        # auto_interval weighs the prompt against no prompt
        data["null_ctx"] = sample.encode_prompts(sd, [""])
    if args.with_prior_preservation:
        files = generate_class_images(sd, args.class_prompt, args.class_data_dir, args.num_class_images,
                                      seed=args.seed, batch_size=args.sample_batch_size, height=args.resolution,
                                      num_inference_steps=args.class_inference_steps, width=args.resolution)
        data["class_mean"], data["class_std"] = encode(sd, load_images(files, args.resolution))
        data["class_ctx"] = sample.encode_prompts(sd, [args.class_prompt])
    sd.vae = sd.text_encoder = None
    return data


def default_quantized(path=Path("runs/toy_w4a8.safetensors"), wbits=4, abits=8):
    """The toy model quantized (W4A8 unless told otherwise) by quant.py's fast preset: the base PEQA trains on
    when no --ckpt is given. Made once (a few minutes on a CPU) and reused while it comes from the shipped toy model;
    made again when the toy model changed (a new checkout), which its stored base_sha256 tells."""
    stale = path.is_file() and ckpt.quantized_from(path) != ckpt.sha256(ckpt.TOY_CKPT)
    if not path.is_file() or stale:
        print(f"quantizing the toy model (W{wbits}A{abits}) into {path} "
              + ("(again: the toy model changed since it was made)" if stale else "(once)"))
        quant.quantize(wbits=wbits, abits=abits, preset="fast", out=path, overwrite=True)
    return path


def resolve_defaults(args, sd):
    """Defaults that depend on the model: the paper's for SD v1, ours for the toy architecture; the model's size."""
    d = TOY_DEFAULTS if sd.unet.config == unet_lib.toy() else REAL_DEFAULTS
    if args.learning_rate is None:
        args.learning_rate = d["full_learning_rate" if args.method == "full" else "learning_rate"]
        if args.method == "peqa":          # the defaults are W4's; a b-bit scale is 15 / (2^b - 1) times as large,
            args.learning_rate *= 15 / (2 ** qlayers.bits_of(sd.unet)[0] - 1)   # so each step moves it as far
    args.max_train_steps = args.max_train_steps or d["max_train_steps"]
    args.resolution = args.resolution or sample.vae_scale_factor(sd.vae) * sd.unet.config.sample_size


def run_config(args):
    keys = ("method", "multi_channel", "n_experts", "bounds", "t_range", "instance_prompt", "class_prompt",
            "with_prior_preservation", "prior_loss_weight", "num_class_images", "resolution", "train_batch_size",
            "learning_rate", "max_train_steps", "seed", "adam_weight_decay", "max_grad_norm", "ckpt", "base_sha256",
            "mixed_precision")
    return {k: getattr(args, k) for k in keys}


def lean_malloc():
    """On Linux CPUs: send every allocation above 128 KB to mmap, so the activation buffers that checkpointing frees
    go back to the OS. glibc otherwise raises that threshold as large blocks are freed and keeps later ones in its
    heap, and the resident peak of a training step grows by hundreds of MB of freed memory (bench/bench_train.py)."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass                                                  # not glibc (e.g. musl): nothing to tune


@contextlib.contextmanager
def folder_lock(folder, flag):
    """Hold `folder`/.lock while this run uses the folder; another run on it is refused, with the holder's process id.
    The lock is the kernel's (flock), so a run that is killed leaves nothing stuck."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise TrainingError(f"{flag} {folder} is in use by another running train.py (process "
                                    f"{f.read().strip() or '?'}); wait for it to finish, or choose another "
                                    f"{flag}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield                                         # closing the file releases the lock


def personalize(args=None, **flags):
    """The whole run, from parse_args' settings or from keyword arguments named as the flags; returns the path of
    the personalized file and the list of losses. The output folder is locked for the run's length, the class-image
    folder while class images are drawn into it (runs of one class share the finished images, as studies.py's do)."""
    args = args if args is not None else parse_args(**flags)
    with folder_lock(args.output_dir, "--output_dir"):
        return run(args)


def run(args):
    if args.device == "cpu":
        lean_malloc()
    out = Path(args.output_dir)
    if args.ckpt is None:
        args.ckpt = str(ckpt.TOY_CKPT if args.method == "full" else default_quantized())
    args.base_sha256 = ckpt.model_sha256(args.ckpt)      # what the base holds, not its file's recorded timings
    sd = ckpt.load_sd(args.ckpt, device=args.device)
    resolve_defaults(args, sd)
    torch.manual_seed(args.seed)
    data = prepare(sd, args)
    model, params = trainable(sd, args.method, args.n_experts, args.bounds, args.multi_channel)
    sd.unet.gradient_checkpointing = args.gradient_checkpointing
    state = out / STATE_FILE
    if args.t_range == "auto":
        if args.resume and state.is_file():       # the interval the run chose when it started
            with safe_open(str(state), framework="pt") as f:
                args.t_range = json.loads(f.metadata()["qdp.train"])["t_range"]
        else:
            args.t_range, rows = auto_interval(model, data, args.seed)
            (out / "auto_interval.json").write_text(json.dumps({"t_range": args.t_range, "parts": rows}, indent=1))
            print("--t_range auto, the prompt's influence per fifth of t: " + ", ".join(
                f"{r['t_range'][0]}-{r['t_range'][1]} {r['score']:.3f}" for r in rows)
                + f" -> {args.t_range[0]}..{args.t_range[1]}")
        warn_idle_experts(args)
    print(f"{args.method}: {sum(p.numel() for p in params.values()):,} trainable numbers in {len(params)} tensors"
          + (f", {args.n_experts} experts over t bounds {args.bounds}" if args.n_experts > 1 else "")
          + f"; t drawn from {args.t_range[0]}..{args.t_range[1]}")
    optimizer = torch.optim.AdamW(params.values(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    precision = sample.PRECISIONS[args.mixed_precision]
    scaler = torch.amp.GradScaler(sd.device.type) if precision == torch.float16 else None
    rng = torch.Generator().manual_seed(args.seed)
    config, start, losses = run_config(args), 0, []
    if args.resume and state.is_file():
        start = load_state(state, params, optimizer, rng, config)
        print(f"resumed from {state} at step {start}")
    bar = sample.progress(range(start, args.max_train_steps), "train", total=args.max_train_steps, unit="steps",
                          initial=start)
    t0 = time.time()
    for step in bar:
        batch = make_batch(data, rng, args.train_batch_size, args.t_range, args.prior_loss_weight)
        loss, mse = optimizer_step(model, params, optimizer, batch, args.max_grad_norm, precision, scaler)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss is {loss.item()} at step {step + 1}; " + resume_advice(state))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.max_train_steps:
            save_state(state, params, optimizer, rng, step + 1, config)
            n = args.train_batch_size
            tqdm.write(f"step {step + 1}/{args.max_train_steps} loss {loss.item():.4f} instance "
                       f"{mse[:n].mean().item():.4f}" + (f" prior {mse[n:].mean().item():.4f}" if len(mse) > n else "")
                       + f" {time.time() - t0:.0f}s")
    tensors = {n: p.detach().cpu().contiguous() for n, p in params.items()}
    ckpt.atomic_save(tensors, out / OUT_FILE, {"qdp.train": json.dumps(config)})
    print(f"wrote {out / OUT_FILE} ({(out / OUT_FILE).stat().st_size / 2**20:.2f} MiB)")
    return out / OUT_FILE, losses


def warn_idle_experts(args):
    lo, hi = args.t_range
    idle = [k for k in range(args.n_experts) if args.bounds[k + 1] <= lo or args.bounds[k] > hi]
    if idle:
        warnings.warn(f"experts {idle} own no timestep of --t_range {args.t_range} and will not train", stacklevel=3)


def parser():
    """train.py's flags (diffusers' DreamBooth script's names where it has them)."""
    p = argparse.ArgumentParser(description="DreamBooth on a quantized SD v1 model by its scales (PEQA, S1, S2).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model
    p.add_argument("--ckpt", default=None, help="quantized file from quant.py, or an FP checkpoint for --method "
                   "full; unset: the toy model (for PEQA quantized W4A8 once into runs/toy_w4a8.safetensors)")
    p.add_argument("--method", choices=["peqa", "full"], default="peqa", help="peqa: only the scales train; full: "
                   "every UNet weight of an FP model (the DreamBooth reference)")
    p.add_argument("--multi_channel", action="store_true", help="also train a scale per input channel of every "
                   "quantized layer (TuneQDM's multi-channel scale update)")
    p.add_argument("--t_range", default=None, help="S1: train only at t in LO,HI (e.g. 354,933); 'content' for the "
                   "SNR band [1e-2, 1] (see content_interval); 'auto' to choose it per subject: the fifth of t "
                   "where the prompt moves the untrained model's prediction most (see auto_interval); unset: all of "
                   "0,999")
    p.add_argument("--n_experts", type=int, default=1, help="S2: number of scale sets (experts), each owning a "
                   "timestep interval; 1: no experts")
    p.add_argument("--expert_boundaries", default=None, help="S2: K-1 inner bounds, e.g. 250,500,750; "
                   "unset: K equal intervals")
    # data (diffusers' DreamBooth flag names); SUPPRESS: no "(default: None)" in --help for the required ones
    p.add_argument("--instance_data_dir", required=True, default=argparse.SUPPRESS,
                   help="required: folder of 3-6 photos of the subject")
    p.add_argument("--instance_prompt", required=True, default=argparse.SUPPRESS,
                   help="required: prompt with the identifier, e.g. 'a photo of sks dog'")
    p.add_argument("--with_prior_preservation", action="store_true", help="add the class-prior preservation loss")
    p.add_argument("--class_data_dir", default=None, help="with --with_prior_preservation: where class images are "
                   "cached (generated if missing)")
    p.add_argument("--class_prompt", default=None, help="with --with_prior_preservation: the prompt of the "
                   "subject's class, e.g. 'a photo of a dog'")
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class-prior loss (an MSE) "
                   "against the instance loss")
    p.add_argument("--num_class_images", type=int, default=100, help="class images for the prior")
    p.add_argument("--sample_batch_size", type=int, default=4, help="images per batch when generating class images")
    p.add_argument("--class_inference_steps", type=int, default=50, help="DDIM steps per class image")
    p.add_argument("--resolution", type=int, default=None, help="training image side in pixels; unset: the model's "
                   "own size")
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=1, help="instance examples per step (plus as many class)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="AdamW learning rate; unset, it depends on the model and method: for PEQA "
                   f"{REAL_DEFAULTS['learning_rate']:g} on SD v1 (the paper's) and {TOY_DEFAULTS['learning_rate']:g} "
                   "on the toy model with 4-bit weights, and 15/255 (1/17) of that with 8-bit weights, whose scales "
                   f"are 17 times smaller; for --method full {REAL_DEFAULTS['full_learning_rate']:g} on SD v1 and "
                   f"{TOY_DEFAULTS['full_learning_rate']:g} on the toy model")
    p.add_argument("--max_train_steps", type=int, default=None,
                   help=f"optimizer steps; unset: {REAL_DEFAULTS['max_train_steps']} on SD v1, "
                   f"{TOY_DEFAULTS['max_train_steps']} on the toy model")
    p.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW's decoupled weight decay")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--mixed_precision", choices=sorted(sample.PRECISIONS), default="no", help="the UNet's forward in "
                   "bf16 or fp16 autocast (fp16 with loss scaling), as diffusers' DreamBooth script; the trained "
                   "tensors and AdamW stay float32. bf16 also runs on a CPU")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each UNet block in backward, to save memory")
    p.add_argument("--seed", type=int, default=0, help="seeds class images, batches, timesteps and noise")
    # output
    p.add_argument("--output_dir", required=True, default=argparse.SUPPRESS,
                   help="required: gets personalized.safetensors and state.safetensors")
    p.add_argument("--checkpointing_steps", type=int, default=50, help="save the resumable state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/state.safetensors")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (cuda where available)")
    return p


def parse_args(argv=None, **flags):
    """The run's settings from the command line (argv), or from keyword arguments named as the flags
    (parse_args(instance_data_dir="dog/", n_experts=4)): the same defaults and checks either way."""
    p = parser()
    args = p.parse_args([*(argv or []), *sample.flags_argv(p, flags)] if flags else argv)

    # the checks diffusers' DreamBooth script makes, and ours
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            p.error("--with_prior_preservation needs --class_data_dir (a folder for the class images)")
        if args.class_prompt is None:
            p.error("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'")
    elif args.class_data_dir or args.class_prompt:
        warnings.warn("--class_data_dir/--class_prompt are ignored without --with_prior_preservation", stacklevel=2)
    args.ckpt = str(args.ckpt) if args.ckpt else None
    if args.ckpt and not Path(args.ckpt).exists():
        p.error(f"--ckpt {args.ckpt} does not exist; for PEQA make a quantized model first: "
                "python quant.py --out q.safetensors")
    if args.method == "full" and args.n_experts != 1:
        p.error("--n_experts needs --method peqa: experts are scale sets over one integer UNet")
    if args.method == "full" and args.multi_channel:
        p.error("--multi_channel needs --method peqa: it adds scales to a quantized UNet")
    if args.t_range in (None, "all"):
        args.t_range = [0, sample.NUM_TRAIN_TIMESTEPS - 1]
    elif args.t_range == "content":
        args.t_range = list(content_interval())
    elif args.t_range != "auto":
        try:
            lo, hi = (int(v) for v in args.t_range.split(","))
        except ValueError:
            p.error(f"--t_range takes LO,HI (e.g. 354,933), 'content' or 'auto', got {args.t_range!r}")
        if not 0 <= lo <= hi < sample.NUM_TRAIN_TIMESTEPS:
            p.error(f"--t_range needs 0 <= LO <= HI <= 999, got {lo},{hi}")
        args.t_range = [lo, hi]
    inner = None
    if args.expert_boundaries:
        try:
            inner = [int(v) for v in args.expert_boundaries.split(",")]
        except ValueError:
            p.error(f"--expert_boundaries takes integers like 250,500,750, got {args.expert_boundaries!r}")
        if inner != sorted(set(inner)) or not all(0 < b < sample.NUM_TRAIN_TIMESTEPS for b in inner):
            p.error("--expert_boundaries must increase strictly within 1..999")
        if args.n_experts not in (1, len(inner) + 1):
            p.error(f"{len(inner)} boundaries make {len(inner) + 1} experts, but --n_experts is {args.n_experts}")
        args.n_experts = len(inner) + 1
    if args.n_experts < 1:
        p.error("--n_experts must be at least 1")
    args.bounds = expert_bounds(args.n_experts, inner)
    if args.t_range != "auto":
        warn_idle_experts(args)
    for name in ("train_batch_size", "num_class_images", "checkpointing_steps", "sample_batch_size",
                 "class_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.learning_rate is not None and not 0 < args.learning_rate < math.inf:
        p.error(f"--learning_rate must be positive and finite, e.g. 2e-4, got {args.learning_rate}")
    for name, least in (("prior_loss_weight", 0), ("adam_weight_decay", 0), ("max_grad_norm", 1e-12)):
        if not least <= getattr(args, name) < math.inf:
            p.error(f"--{name} must be a finite number {'above' if least else 'at least'} 0, got {getattr(args, name)}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        p.error(f"--resolution must be a positive multiple of 8 (SD's VAE factor; sample.py draws only such sizes), "
                f"e.g. 512, got {args.resolution}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        p.error("--max_train_steps must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA is not available here; use --device cpu")
    out = Path(args.output_dir)
    try:                                # a file where a folder belongs, or a place that cannot be written
        ckpt.check_output(out, "--output_dir", overwrite=True, folder=True)
        if args.with_prior_preservation:
            ckpt.check_output(args.class_data_dir, "--class_data_dir", overwrite=True, folder=True)
    except ckpt.CheckpointError as e:
        p.error(str(e))
    if (out / STATE_FILE).is_file() and not args.resume:
        p.error(f"{out} already holds a run; add --resume to continue it, or pick another --output_dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    sample.pick_threads(args.device)
    try:
        personalize(args)
    except (TrainingError, ckpt.CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    import train as module  # the importable module, not a __main__ copy whose classes the other modules would not know
    module.main()
