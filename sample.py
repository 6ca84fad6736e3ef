"""Text-to-image sampling for Stable Diffusion v1: the noise schedule, the DDIM and PLMS samplers, classifier-free
guidance, and `generate` (prompts in, PIL images out).

The schedule is SD v1's: 1000 training steps of DDPM (arXiv 2006.11239) with latent diffusion's "scaled_linear" betas
(arXiv 2112.10752). DDIM (arXiv 2010.02502) and PLMS, the pseudo linear multistep method of PNDM (arXiv 2202.09778),
walk it backwards in a few dozen steps; classifier-free guidance (arXiv 2207.12598) pushes each step towards the
prompt. Every choice follows diffusers' StableDiffusionPipeline with SD v1's scheduler config (steps_offset=1,
set_alpha_to_one=False, "leading" spacing, PNDM with skip_prk_steps), so one seed gives the same image in both.

    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photo of an astronaut riding a horse" \
        --device cuda --num_images_per_prompt 4 --out astronaut.png         # GPU: a 2x2 grid of 512x512 images
    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a watercolor fox" --device cpu \
        --height 256 --width 256 --num_inference_steps 20 --scheduler plms --out fox.png   # laptop CPU, float32
    python sample.py --ckpt q.safetensors --scales out/sks-dog/personalized.safetensors --expert 2 \
        --export sks-dog.safetensors      # a plain FP16 SD v1 file (or a diffusers folder) for other tools
"""
import argparse
import functools
import json
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from safetensors import safe_open
from tqdm import tqdm

import ckpt
import qlayers
import unet as unet_lib

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SD v1's scheduler config
STEPS_OFFSET = 1  # SD v1 shifts every inference timestep up by one: 981, 961, ..., 1 for 50 steps
SCHEDULERS = ("ddim", "plms")
EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
COMPVIS_SUFFIXES = (".safetensors", ".ckpt")  # --export to one of these writes one file, to anything else a folder


_THREADS_SAID = []


PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # --mixed_precision of train and quant


def autocast(device, precision):
    """torch.autocast on `device` ("cpu", "cuda:0" or a torch.device) in `precision` (None: off, float32 as it is)."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=precision or torch.float32, enabled=precision is not None)


def pick_threads(device="cpu"):
    """torch's CPU thread count for a command, said in one line (once per process). OMP_NUM_THREADS wins if set;
    otherwise one thread per core that other jobs leave free (cores minus the 1-minute load average, at least one):
    torch's threads wait for each other at every operation, so a thread that shares its core with another job stalls
    all of them (10-30x slower on a 2-core machine; README, Troubleshooting)."""
    if device != "cpu":
        return torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:                # the user's choice, not second-guessed or announced
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    torch.set_num_threads(max(1, min(cores, round(cores - load))))
    if not _THREADS_SAID:
        _THREADS_SAID.append(True)
        print(f"threads: {torch.get_num_threads()} torch thread(s) ({cores} cores, load {load:.1f} from other jobs; "
              "set OMP_NUM_THREADS to choose)", file=sys.stderr, flush=True)
    return torch.get_num_threads()


def progress(iterable, desc, total=None, unit="it", initial=0, inner=False):
    """A labelled progress bar (tqdm) on a terminal. Where stderr is not one (a log file, a pipe, a notebook under
    test) a bar would leave a carriage-return line per update, so instead: nothing for an `inner` loop (the DDIM steps
    of one image), and for the others a plain line at every tenth of the way."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=not inner)
    return PlainProgress(iterable, desc, total, unit, initial, quiet=inner)


class PlainProgress:
    """progress() off a terminal: iterates as tqdm does, prints "desc: n/total unit (pct%) in s" every tenth."""

    def __init__(self, iterable, desc, total, unit, initial, quiet):
        self.iterable, self.desc, self.unit, self.n, self.quiet = iterable, desc, unit, initial, quiet
        self.total = total if total is not None else (len(iterable) + initial if hasattr(iterable, "__len__") else None)
        self.postfix, self.t0 = "", time.time()

    def __iter__(self):
        every = max(1, (self.total or 10) // 10)
        for item in self.iterable:
            yield item
            self.n += 1
            if not self.quiet and (self.n % every == 0 or self.n == self.total):
                print(f"{self.desc}: {self.n}/{self.total or '?'} {self.unit}"
                      + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")
                      + f" in {time.time() - self.t0:.0f} s" + (f", {self.postfix}" if self.postfix else ""),
                      file=sys.stderr, flush=True)

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def set_postfix_str(self, s):
        self.postfix = s


def flags_argv(parser, flags):
    """Keyword settings -> the command line `parser` reads, so a script's stage can be called from Python with the
    same names, defaults and checks as its flags: train.parse_args(instance_data_dir="dog/", n_experts=4). True
    gives a switch, False its --no- form (or nothing), None leaves the default; a name the parser lacks is a
    TypeError."""
    known = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv = []
    for name, value in flags.items():
        if name not in known:
            raise TypeError(f"unknown setting {name!r}; the settings are {', '.join(sorted(known))}")
        action, opt = known[name], known[name].option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(opt if value else "--no-" + opt[2:])
        elif action.nargs == 0:                                           # a switch such as --overwrite
            argv += [opt] if value else []
        elif value is not None:
            argv += [opt, str(value)]
    return argv


def alphas_cumprod():
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (1000,) float32, for betas that are linear in sqrt(beta).

    Float32 throughout, as diffusers computes it, so the two agree bit for bit."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)  # DDPM eq. 4


def alpha_prev(alphas_cumprod, t_prev):
    """alpha_bar at the step's target timestep. Past the last step (t_prev < 0) SD v1 uses alpha_bar_0, not 1
    (set_alpha_to_one=False), so the final image keeps a trace of the smallest noise level."""
    return alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]


def ddim_timesteps(num_inference_steps):
    """The n timesteps, descending: every (1000 // n)-th from 0, plus the offset ("leading" spacing)."""
    n = num_inference_steps
    if not 1 <= n < NUM_TRAIN_TIMESTEPS:
        # with steps_offset=1, n=1000 would ask for timestep 1000, one past the end of the schedule
        raise ValueError(f"num_inference_steps must be in 1..{NUM_TRAIN_TIMESTEPS - 1}, got {n}")
    stride = NUM_TRAIN_TIMESTEPS // n
    return [i * stride + STEPS_OFFSET for i in reversed(range(n))]


def plms_timesteps(num_inference_steps):
    """DDIM's list with its second timestep repeated: n + 1 UNet calls, two of them for the first interval."""
    ts = ddim_timesteps(num_inference_steps)
    return ts[:2] + ts[1:]


def randn(shape, generator, device, dtype):
    """Gaussian noise drawn on the generator's device, then moved to `device`. A CPU generator thus gives the same
    numbers whatever the model runs on; diffusers' pipeline draws the same way, so seeds carry over."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


class DDIM:
    """Deterministic (eta=0) or stochastic (eta>0) DDIM over SD v1's timesteps."""

    def __init__(self, num_inference_steps, eta=0.0, generator=None):
        self.timesteps = ddim_timesteps(num_inference_steps)
        self.stride = NUM_TRAIN_TIMESTEPS // num_inference_steps
        self.alphas_cumprod = alphas_cumprod()
        self.eta, self.generator = eta, generator

    def step(self, x, eps, t):
        """x_t -> x_{t - stride} given the model's eps(x_t, t); the scalars stay float32 0-d tensors, as in diffusers."""
        a_t = self.alphas_cumprod[t]
        a_prev = alpha_prev(self.alphas_cumprod, t - self.stride)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5                                      # DDIM eq. 12, predicted x_0
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5        # DDIM eq. 16
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps                  # DDIM eq. 12
        if self.eta > 0:  # one draw per step, shaped like eps, from the generator that drew x_T
            x_prev = x_prev + sigma * randn(eps.shape, self.generator, eps.device, eps.dtype)  # DDIM eq. 12, noise
        return x_prev


def transfer(x, eps, t, t_prev, alphas_cumprod):
    """PNDM's transfer x_t -> x_{t_prev} for a given eps: the eta=0 DDIM step, rearranged (PNDM eq. 9)."""
    a_t, a_prev = alphas_cumprod[t], alpha_prev(alphas_cumprod, t_prev)
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def adams_bashforth(eps):
    """The eps to transfer with: Adams-Bashforth of order len(eps) (1..4) over the history, newest last."""
    e = eps[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


class PLMS:
    """PNDM's pseudo linear multistep sampler as SD v1 runs it (diffusers' PNDMScheduler, skip_prk_steps=True).

    Instead of PNDM's Runge-Kutta warm-up it spends one extra UNet call on the first interval (Heun's method: average
    the eps at both ends and redo the step), then climbs from order 2 to order 4 as the eps history fills up."""

    def __init__(self, num_inference_steps):
        self.timesteps = plms_timesteps(num_inference_steps)
        self.stride = NUM_TRAIN_TIMESTEPS // num_inference_steps
        self.alphas_cumprod = alphas_cumprod()
        self.eps = []  # the last (up to) 4 eps that enter the multistep formula, oldest first
        self.x_start = None  # x at the first timestep, where the Heun correction restarts from
        self.calls = 0

    def step(self, x, eps, t):
        """x_t -> x_{t - stride} given the model's eps(x_t, t); the second call (t repeated) redoes the first step."""
        call, self.calls = self.calls, self.calls + 1
        if call == 1:  # eps at the end of the first interval: average with its start; it never joins the history
            return transfer(self.x_start, (eps + self.eps[-1]) / 2, t + self.stride, t, self.alphas_cumprod)
        if call == 0:
            self.x_start = x
        self.eps = self.eps[-3:] + [eps]
        return transfer(x, adams_bashforth(self.eps), t, t - self.stride, self.alphas_cumprod)


def guided_eps(unet, x, t, ctx, uncond_ctx, guidance_scale, callback=None):
    """eps at (x (B,C,h,w), integer timestep t) steered towards ctx (B,77,D) and away from uncond_ctx (B,77,D).

    Both halves come from one UNet forward on the batch [uncond, cond] (diffusers' order). With guidance_scale <= 1
    the unconditional half is skipped. `callback(t, x, ctx)` sees the exact UNet inputs, t as a (2B,) long tensor."""
    guided = guidance_scale > 1
    if guided:
        x, ctx = torch.cat([x, x]), torch.cat([uncond_ctx, ctx])
    t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if callback is not None:
        callback(t, x, ctx)
    eps = unet(x, t, ctx)
    if not guided:
        return eps
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # CFG eq. 6 with guidance_scale = 1 + w


@torch.no_grad()  # not inference_mode: calibration keeps the tensors it records and later trains on them
def sample_latents(unet, ctx, uncond_ctx, latents, num_inference_steps, guidance_scale, scheduler="ddim", eta=0.0,
                   generator=None, callback=None):
    """Denoise latents x_T (B,C,h,w) into x_0 with `unet(x, t, ctx) -> eps`.

    `generator` feeds DDIM's eta noise; `callback(i, t, x, ctx)` is called before the i-th UNet forward with its
    exact inputs (see `guided_eps`), e.g. to record calibration data."""
    if scheduler == "ddim":
        sampler = DDIM(num_inference_steps, eta, generator)
    elif scheduler == "plms":
        sampler = PLMS(num_inference_steps)
    else:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    x = latents
    for i, t in enumerate(progress(sampler.timesteps, f"{scheduler} steps", unit="steps", inner=True)):
        hook = None if callback is None else functools.partial(callback, i)
        x = sampler.step(x, guided_eps(unet, x, t, ctx, uncond_ctx, guidance_scale, hook), t)
    return x


def vae_scale_factor(vae):
    """How much the VAE shrinks each side: 2 per level after the first (8 for SD v1's four levels)."""
    return 2 ** (len(vae.config.ch_mult) - 1)


@torch.no_grad()
def encode_prompts(sd, prompts):
    """list of B strings -> CLIP text context (B,77,D), the last hidden state as SD v1 uses it."""
    ids = ckpt.tokenize(sd.tokenizer, prompts).to(sd.text_encoder.device)
    return sd.text_encoder(ids).last_hidden_state


@torch.no_grad()
def decode_images(sd, latents):
    """latents (B,C,h,w) -> B PIL images, rounded to uint8 exactly as diffusers' numpy_to_pil does."""
    x = sd.vae.decode_latents(latents)  # decode(latents / scale_factor), roughly in [-1, 1]
    x = (x * 0.5 + 0.5).clamp(0, 1)
    pixels = (x.cpu().permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(p) for p in pixels]


def generate(sd, prompt, negative_prompt="", seed=0, num_inference_steps=50, guidance_scale=7.5, height=None,
             width=None, scheduler="ddim", eta=0.0, num_images_per_prompt=1, output_type="pil", latents=None):
    """Prompt(s) -> list of PIL images (all images of prompt 0 first), or the latents (B,C,h,w) with
    output_type="latent". Same seed and settings as diffusers' pipeline with a CPU generator -> same images.
    height and width default to the size the model was trained at (unet.config.sample_size latents). `latents`,
    as in diffusers, gives x_T instead of drawing it (then `seed` only feeds DDIM's eta noise): see initial_noise."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    f = vae_scale_factor(sd.vae)
    height = height or f * sd.unet.config.sample_size
    width = width or height
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    param = next(sd.unet.parameters())
    ctx = encode_prompts(sd, prompts).to(param).repeat_interleave(num_images_per_prompt, dim=0)
    uncond_ctx = None
    if guidance_scale > 1:
        uncond_ctx = encode_prompts(sd, negatives).to(param).repeat_interleave(num_images_per_prompt, dim=0)
    # one CPU generator draws x_T and then every DDIM eta noise, in that order
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (len(ctx), sd.unet.config.in_channels, height // f, width // f)
    if latents is None:
        latents = randn(shape, generator, param.device, param.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for these prompts and sizes, got {tuple(latents.shape)}")
    latents = latents.to(param)
    latents = sample_latents(sd.unet, ctx, uncond_ctx, latents, num_inference_steps, guidance_scale, scheduler, eta,
                             generator)
    return latents if output_type == "latent" else decode_images(sd, latents)


def initial_noise(sd, n, seed, height=None):
    """The x_T that generate() draws for n images from `seed` (on the model's device and dtype): stacking the
    noise of several prompts, each from its own seed, samples them in one batch as they would come one by one."""
    f, param = vae_scale_factor(sd.vae), next(sd.unet.parameters())
    side = (height or f * sd.unet.config.sample_size) // f
    generator = torch.Generator("cpu").manual_seed(seed)
    return randn((n, sd.unet.config.in_channels, side, side), generator, param.device, param.dtype)


def image_grid(images):
    """Paste images into one roughly square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


# --------------------------------------------------------------------------------------------------------------------
# export: the (personalized) quantized model as a plain checkpoint


def labelled_grid(cells, cols=8, zoom=2):
    """A contact sheet: each cell an image (zoomed, nearest neighbour, to show the true pixels) over its label."""
    font, side, text_h = ImageFont.load_default(), 64 * zoom, 40
    rows = math.ceil(len(cells) / cols)
    out = Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    d = ImageDraw.Draw(out)
    for i, (img, label) in enumerate(cells):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        out.paste(img.resize((side, side), Image.Resampling.NEAREST), (x, y))
        d.multiline_text((x + 2, y + side + 1), "\n".join(textwrap.wrap(label, 24)[:3]), fill="black", font=font,
                         spacing=0)
    return out


def experts_in(scales):
    """How many S2 experts train.py's output holds (1 for PEQA and full DreamBooth), from the file's header alone;
    None if the header cannot be read (ckpt.load_personalized then says why)."""
    try:
        with safe_open(str(scales), framework="pt") as f:
            return int(json.loads(f.metadata()["qdp.train"]).get("n_experts", 1))
    except Exception:
        return None


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export(sd, path, export_format="compvis", dtype=torch.float16):
    """Write `sd` as a plain SD v1 checkpoint, its UNet dequantized (ckpt.plain_unet): one CompVis .safetensors or
    .ckpt file, or a diffusers folder. Activation quantization does not survive: the file computes what the quantized
    model computes with float activations. Atomic: a file or folder is written under a temporary name and renamed
    over `path`, so a crash leaves the previous export (or none), never half of one."""
    if not isinstance(sd.unet, unet_lib.UNet):
        raise ValueError("a merged model holds one UNet; put one S2 expert in place first (ExpertUNet.use(k))")
    plain = ckpt.StableDiffusion(ckpt.plain_unet(sd.unet), sd.vae, sd.text_encoder, sd.tokenizer)
    path = Path(path)
    if export_format == "compvis":
        ckpt.save_compvis(plain, path, dtype)
        return
    tmp, old = (path.with_name(f".{path.name}.{end}") for end in ("tmp", "old"))
    remove(tmp)
    remove(old)
    ckpt.save_diffusers(plain, tmp, dtype)
    if path.exists():                  # a folder cannot be renamed over another: move the old one aside first
        os.replace(path, old)
    os.replace(tmp, path)
    remove(old)


def size_of(path):
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate images with Stable Diffusion v1.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model
    parser.add_argument("--ckpt", default=str(ckpt.TOY_CKPT), help="CompVis single-file checkpoint or diffusers folder")
    parser.add_argument("--scales", default=None, help="train.py's personalized.safetensors for this --ckpt "
                        "(PEQA scales, S2 experts, or full weights); unset: the --ckpt model as it is")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (cuda where available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="dtype of the weights and activations; unset: float16 on cuda, float32 on cpu")
    # prompt
    parser.add_argument("--prompt", default=None, help="what to draw (optional with --export)")
    parser.add_argument("--negative_prompt", default="", help="what to steer away from (the unconditional prompt); "
                        "empty: plain classifier-free guidance")
    # sampling
    parser.add_argument("--seed", type=int, default=0, help="seeds the CPU generator for x_T and DDIM's eta noise")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps (PLMS makes one more)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance; <=1 disables")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8; "
                        "unset: the model's own size, 512 for SD v1, 64 for the toy model")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8; "
                        "unset: as --height")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim",
                        help="ddim, or plms: PNDM's linear multistep")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--num_images_per_prompt", type=int, default=1, help="images to draw, in one batch")
    # output
    parser.add_argument("--out", default="sample.png", help="image file; several images are pasted into one grid. "
                        "An image sample.py wrote is replaced; any other file needs --overwrite")
    # export
    parser.add_argument("--export", default=None, help="write the (personalized) model here as a plain SD v1 "
                        "checkpoint, its UNet dequantized: a .safetensors/.ckpt file or a diffusers folder; samples "
                        "too only if --prompt is given")
    parser.add_argument("--export_format", choices=["compvis", "diffusers"], default=None,
                        help="layout of --export; unset: compvis for a path ending in .safetensors or .ckpt, "
                        "diffusers otherwise")
    parser.add_argument("--export_dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="dtype of the exported weights; unset: fp16")
    parser.add_argument("--expert", type=int, default=None, help="S2: use expert K's scales at every timestep; "
                        "--export needs it when --scales holds several experts; unset: the experts take turns as "
                        "t falls")
    parser.add_argument("--overwrite", action="store_true", help="let --export, or --out, replace an existing file "
                        "or folder that sample.py did not write")
    args = parser.parse_args(argv)

    for side in (args.height, args.width):
        if side is not None and (side < 8 or side % 8):
            parser.error(f"--height and --width must be positive multiples of 8 (SD's VAE factor), e.g. 512; "
                         f"got {side}")
    if not 1 <= args.num_inference_steps < NUM_TRAIN_TIMESTEPS:
        parser.error(f"--num_inference_steps must be in 1..{NUM_TRAIN_TIMESTEPS - 1}, e.g. 50")
    if not 0 <= args.eta <= 1:
        parser.error("--eta must be in [0, 1]")
    if args.eta > 0 and args.scheduler != "ddim":
        parser.error("--eta only applies to --scheduler ddim; drop it or switch scheduler")
    if args.num_images_per_prompt < 1:
        parser.error("--num_images_per_prompt must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        parser.error(f"--out needs an image suffix such as .png, got {args.out!r}")
    if not math.isfinite(args.guidance_scale):
        parser.error(f"--guidance_scale must be a finite number, e.g. 7.5 (<= 1 disables guidance), got "
                     f"{args.guidance_scale}")
    if args.prompt is not None:            # checked before the work, not found after sampling
        try:
            ckpt.check_output(args.out, "--out", args.overwrite or written_by_us(args.out),
                              [args.ckpt, args.scales, args.export])
        except ckpt.CheckpointError as e:
            parser.error(str(e))
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    check_export_args(parser, args)
    return args


def viewable_copy(out, size):
    """Where a small sample of `size` (under 256 px a side, as the toy model's 64 px) also goes, enlarged with
    nearest-neighbour pixels so that it opens at a readable size: out_big.png beside out. None for large images."""
    return Path(out).with_name(Path(out).stem + "_big.png") if min(size) < 256 else None


def written_by_us(path):
    """Whether `path` is an image that sample.py wrote (it marks its PNGs), which a new sample may replace."""
    try:
        with Image.open(path) as im:
            return im.info.get("qdp") == "sample.py"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_export_args(parser, args):
    """The export and expert flags' checks, before any loading."""
    if args.prompt is None and args.export is None:
        parser.error("--prompt is required (what to draw), unless --export writes the model to a file")
    if args.export is None and (args.export_format or args.export_dtype):
        parser.error("--export_format and --export_dtype only apply with --export PATH")
    n = experts_in(args.scales) if args.scales else 1
    if args.expert is not None and n == 1:
        parser.error("--expert picks one S2 expert of --scales, but " + (f"{args.scales} holds a single set"
                     if args.scales else "no --scales file is given") + "; drop --expert")
    if args.expert is not None and n and not 0 <= args.expert < n:
        parser.error(f"--expert must be in 0..{n - 1}: {args.scales} holds {n} S2 experts")
    if args.export is None:
        return
    if n and n > 1 and args.expert is None:
        parser.error(f"{args.scales} holds {n} S2 experts that take turns as t falls, but a merged single model has "
                     f"one set of weights for every t: pick one with --expert K (0..{n - 1}), or export each")
    path = Path(args.export)
    one_file = path.suffix.lower() in COMPVIS_SUFFIXES
    args.export_format = args.export_format or ("compvis" if one_file else "diffusers")
    args.export_dtype = args.export_dtype or "fp16"
    if args.export_format == "compvis" and not one_file:
        parser.error(f"--export_format compvis writes one file; name it .safetensors or .ckpt, not {path.name!r}")
    if args.export_format == "diffusers" and one_file:
        parser.error(f"--export_format diffusers writes a folder; drop the {path.suffix} suffix of --export")
    if any(path.resolve() == Path(p).resolve() for p in (args.ckpt, args.scales) if p):
        parser.error("--export would overwrite --ckpt or --scales; choose another path")
    if path.exists() and not args.overwrite:
        parser.error(f"--export {path} already exists; add --overwrite to replace it, or choose another path")
    if path.is_dir() and (one_file or not (path / "model_index.json").is_file()):
        parser.error(f"--export {path} is a folder that holds no diffusers model; qdp will not replace it")


def main(argv=None):
    args = parse_args(argv)
    pick_threads(args.device)
    dtype = getattr(torch, args.dtype)
    try:  # an export dequantizes in float32 and casts when it writes
        sd = ckpt.load_sd(args.ckpt, device=args.device, dtype=torch.float32 if args.export else dtype)
        if args.scales:
            sd = ckpt.load_personalized(sd, args.scales, base_path=args.ckpt)
            if args.expert is not None:  # one expert's scales, in place for every t
                sd.unet.use(args.expert)
                sd.unet = sd.unet.unet
    except ckpt.CheckpointError as e:
        sys.exit(f"error: {e}")
    if args.export:
        layer = next((m for m in sd.unet.modules() if isinstance(m, qlayers.QuantLayer)), None)
        if layer is not None and layer.abits < 32:
            print(f"warning: {args.ckpt} quantizes activations to {layer.abits} bits, which a plain checkpoint cannot "
                  f"express; the export computes with float activations (W{layer.wbits}A32)", file=sys.stderr)
        t0 = time.perf_counter()
        export(sd, args.export, args.export_format, EXPORT_DTYPES[args.export_dtype])
        print(f"wrote {args.export}: {args.export_format} layout, {args.export_dtype}, "
              f"{size_of(args.export) / 2**20:.1f} MiB" + (f", expert {args.expert}" if args.expert is not None else "")
              + f", in {time.perf_counter() - t0:.1f} s")
        if args.prompt is None:
            return
        sd.to(dtype=dtype)
    images = generate(sd, args.prompt, args.negative_prompt, args.seed, args.num_inference_steps, args.guidance_scale,
                      args.height, args.width, args.scheduler, args.eta, args.num_images_per_prompt)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mark = PngImagePlugin.PngInfo()
    mark.add_text("qdp", "sample.py")
    grid = image_grid(images)
    grid.save(args.out, **({"pnginfo": mark} if Path(args.out).suffix.lower() == ".png" else {}))
    note = ""
    big = viewable_copy(args.out, grid.size)
    if big is not None and (not big.exists() or written_by_us(big)):   # a toy image opens as a thumbnail otherwise
        zoom = -(-256 // min(grid.size))
        grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST).save(big, pnginfo=mark)
        note = f"; {zoom}x for viewing: {big}"
    print(f"wrote {len(images)} image(s) of {images[0].width}x{images[0].height} px to {args.out}{note}")


if __name__ == "__main__":
    import sample as module  # the importable module, not a __main__ copy whose classes the other modules would not know
    module.main()
