"""The toy world's models, their one-command pretraining on 2 CPU cores, and the ceiling chain that measures them.

No pretrained SD exists on a CPU-only machine, so qdp ships a world of its own (world.py draws captioned 64x64 scenes)
and pretrains here, at a small size, the same stack SD v1 uses (latent diffusion, arXiv 2112.10752):
  1. the VAE (vae.py, `toy` preset): 64x64 images <-> 16x16x4 latents;
  2. a CLIP trained contrastively on the world (arXiv 2103.00020), with a class contrast (UniCL, arXiv 2204.03610);
     its text tower, frozen, conditions the UNet;
  3. the UNet (unet.py, `toy` preset) on the VAE's latents, eps-prediction with SD v1's noise schedule, min-SNR
     weighting (arXiv 2303.09556) and 10% empty captions for classifier-free guidance (arXiv 2207.12598);
  4. the evaluators, trained apart from the SD model: a second CLIP for CLIP-I/CLIP-T, and a ViT trained without
     labels (SimCLR's contrastive views, arXiv 2002.05709, of one object on two backgrounds) standing in for DINO
     (arXiv 2104.14294).
`--report` measures the ceiling chain: how much of what makes an image itself survives each stage (real renders, VAE
reconstructions, UNet samples, personalized samples), read by the evaluators.
It lives apart from the method's modules because it belongs to neither the method nor the SD model: it only makes
the embedded default model (assets/toy/) that every script falls back to when no --ckpt is given.

    python -m toyworld.toy                          # pretrain everything (about an hour on 2 cores); rerun to resume
    python -m toyworld.toy --stages eval_clip,dino  # retrain the evaluators alone, the SD model kept
    python -m toyworld.toy --scale 0.02 --out runs/toy_smoke --no_export   # every stage in a minute, a smoke test
    python -m toyworld.toy --report                 # the ceiling chain of the shipped models
"""
import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, ViTConfig, ViTModel

import ckpt
import eval as metrics
import sample
import unet as unet_lib
import vae as vae_lib
from toyworld import world

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy"
SD_FILE, EVAL_FILE = ASSETS / "toy_sd.safetensors", ASSETS / "toy_eval.safetensors"
SIZE = 64  # image side; the VAE makes 16x16x4 latents of it


@dataclass
class Plan:
    """Steps, batch sizes and learning rates of each stage; `scale` shrinks every step count (smoke runs)."""
    n_images: int = 24000
    vae_steps: int = 6000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4                           # weight of the KL term (per latent element, against per-pixel L1+L2)
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 2e-3
    class_only: float = 0.3                        # share of CLIP captions that name only the class
    class_contrast: float = 1.0                    # weight of the image-vs-8-class-prompts loss of both CLIPs
    named_share: float = world.NAMED_SHARE         # share of training scenes that are named individuals
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    min_snr: float = 5.0                           # min-SNR-gamma loss weighting of the UNet
    eval_clip_steps: int = 1500
    dino_steps: int = 1500
    dino_batch: int = 96
    dino_twins: bool = True                        # positive pairs: one object on two backgrounds, in two poses
    seed: int = 0

    def scaled(self, scale):
        steps = {k: max(2, int(v * scale)) for k, v in asdict(self).items() if k.endswith("_steps")}
        return Plan(**{**asdict(self), **steps, "n_images": max(64, int(self.n_images * min(1.0, scale * 4)))})


def text_config(width=64, layers=4):
    """A CLIP text tower small enough for a CPU, with the real SD tokenizer's 49,408-token vocabulary."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=width // 16, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def clip_config(width=64, vision_width=64, vision_layers=3):
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=vision_width,
                              intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_width // 16, hidden_act="quick_gelu", projection_dim=width)
    return CLIPConfig(text_config=text_config(width).to_dict(), vision_config=vision.to_dict(), projection_dim=width)


def dino_config():
    return ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=256,
                     num_hidden_layers=4, num_attention_heads=4)


# --------------------------------------------------------------------------------------------------------------------
# data: rendered once per run, captions drawn afresh at every step


def as_uint8(images):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


class Data:
    """`n` training scenes of the world as uint8 images (n,3,64,64), and their scenes for captioning."""

    def __init__(self, n, seed, named_share=0.0):
        rng = random.Random(seed)
        self.seed = seed
        self.scenes = [world.sample_scene(rng, "train", named_share) for _ in range(n)]
        self.images = as_uint8(world.render(s, seed=seed * 1_000_003 + i)[0]
                               for i, s in enumerate(sample.progress(self.scenes, "render scenes", unit="scenes")))
        rng = random.Random(seed + 77)                  # each scene's object again, on another background
        self.twin_scenes = [replace(s, context=rng.choice([c for c in world.CONTEXTS if c != s.context]))
                            for s in self.scenes]
        self._twins = None

    def twins(self):
        """Renders of `twin_scenes`: the same objects (class, color, pattern, property, accessory) in another pose on
        another background, the views that teach the DINO stand-in what an object is, whatever lies behind it.
        Rendered once, on first use, and only by the stage that needs them."""
        if self._twins is None:
            self._twins = as_uint8(world.render(s, seed=self.seed * 1_000_003 + 500_000 + i)[0]
                                   for i, s in enumerate(sample.progress(self.twin_scenes, "render twins",
                                                                                 unit="scenes")))
        return self._twins

    def batch(self, step, size, seed):
        """The indices, pixels in [-1, 1] and fresh captions of batch `step`: a pure function of (seed, step),
        so a resumed run sees exactly the batches an uninterrupted one would."""
        g = torch.Generator().manual_seed(seed * 7919 + step)
        idx = torch.randint(len(self.scenes), (size,), generator=g)
        rng = random.Random(seed * 7919 + step)
        captions = [world.caption(self.scenes[i], rng) for i in idx.tolist()]
        return idx, self.images[idx].float() / 127.5 - 1, captions


def augment(x, g):
    """Two views for self-supervised training: a random crop (50-100% of the side) resized back, and a flip.
    Colors stay: a subject's color is part of its identity."""
    B, _, H, W = x.shape
    out = []
    for i in range(B):
        s = int(H * (0.5 + 0.5 * torch.rand(1, generator=g).item()))
        y0, x0 = torch.randint(H - s + 1, (2,), generator=g).tolist()
        crop = x[i:i + 1, :, y0:y0 + s, x0:x0 + s]
        crop = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        out.append(crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# one training loop for every stage


def fit(name, model, loss_fn, steps, lr, out, params=None, ema=None, save_every=250):
    """AdamW with linear warm-up and cosine decay, a resumable checkpoint every `save_every` steps, a progress bar
    and one log line per interval. `loss_fn(step)` returns the step's loss; `ema` (a copy of model) tracks an
    exponential moving average of the weights. Returns the list of losses of this call."""
    path = Path(out) / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    start, losses = 0, []
    if path.exists():                                   # resume: weights, optimizer moments, EMA and the step
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
    warmup = max(1, min(100, steps // 10))
    bar = sample.progress(range(start, steps), name, total=steps, unit="steps", initial=start)
    t0 = time.time()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: loss is {loss.item()} at step {step}; the last good state is in {path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}
            if ema is not None:
                state["ema"] = ema.state_dict()
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            tqdm.write(f"{name} step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                       f"{time.time() - t0:.0f}s")
    return losses


# --------------------------------------------------------------------------------------------------------------------
# the stages


def train_vae(data, plan, out):
    """Reconstruction (L1 + L2) with a light KL pull towards N(0, 1), as SD's VAE but without its GAN and LPIPS,
    on 32x32 crops of the 64x64 images, in bfloat16 autocast (1.74x faster on this CPU: bench/bench_toy_bf16.py)."""
    torch.manual_seed(plan.seed)
    model = vae_lib.AutoencoderKL(vae_lib.toy())

    def loss_fn(step):
        _, x, _ = data.batch(step, plan.vae_batch, plan.seed + 1)
        y0, x0 = (step * 7) % 33, (step * 13) % 33        # the VAE is convolutional: 32x32 crops cost a quarter
        x = x[:, :, y0:y0 + 32, x0:x0 + 32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, logvar = (v.float() for v in model.encode(x))
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = model.decode(z).float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + plan.vae_kl * kl

    fit("vae", model, loss_fn, plan.vae_steps, plan.vae_lr, out)
    with torch.no_grad():                               # SD's 0.18215 was 1/std of its latents; measure ours
        _, x, _ = data.batch(10**6, min(512, len(data.scenes)), plan.seed)
        model.config.scale_factor = round(1.0 / model.encode(x)[0].std().item(), 5)
    return model.eval()


def train_clip(data, plan, out, name="clip", seed_offset=2, vision_width=64, vision_layers=3):
    """CLIP's symmetric contrastive loss between images and their (partial) captions."""
    torch.manual_seed(plan.seed + seed_offset)
    model = CLIPModel(clip_config(vision_width=vision_width, vision_layers=vision_layers))
    tokenizer = ckpt.load_tokenizer()
    steps = plan.clip_steps if name == "clip" else plan.eval_clip_steps
    class_ids = tokenizer(CLASS_PROMPTS, padding="longest", return_tensors="pt").input_ids
    # the names of world.NAMES keep their random initial embeddings, as every word outside the world does ("sks"
    # included): the text tower learns to carry an arbitrary word's identity, not 48 learned vectors
    names = torch.tensor([tokenizer(n).input_ids[1] for n in world.NAMES])
    model.text_model.embeddings.token_embedding.weight.register_hook(lambda g: g.index_fill(0, names, 0.0))

    def loss_fn(step):
        idx, x, captions = data.batch(step, plan.clip_batch, plan.seed + seed_offset)
        # some captions name only the class: then only the object's shape tells the images apart, which colors and
        # backgrounds would otherwise let the contrastive loss ignore
        g = torch.Generator().manual_seed(plan.seed * 31337 + step)
        captions = [f"a photo of a {data.scenes[i].cls}" if torch.rand(1, generator=g).item() < plan.class_only
                    else c for i, c in zip(idx.tolist(), captions)]
        # padded to the longest caption, not to 77: the text tower is causal, so a token's state never depends on
        # the padding after it, and training costs a fraction
        ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=x, return_loss=True)
        if not plan.class_contrast:
            return out.loss
        # class contrast (as UniCL, arXiv 2204.03610): each image also picks its class among the 8 class prompts,
        # so that shape is learned even where color and background already tell a batch's images apart
        classes = F.normalize(model.text_projection(model.text_model(input_ids=class_ids).pooler_output), dim=-1)
        logits = model.logit_scale.exp() * F.normalize(out.image_embeds, dim=-1) @ classes.T
        target = torch.tensor([world.CLASSES.index(data.scenes[i].cls) for i in idx.tolist()])
        return out.loss + plan.class_contrast * F.cross_entropy(logits, target)

    fit(name, model, loss_fn, steps, plan.clip_lr, out)
    return model.eval()


CLASS_PROMPTS = [f"a photo of a {c}" for c in world.CLASSES]


def text_tower(clip):
    """The CLIPTextModel inside a trained CLIPModel, as SD's conditioning encoder."""
    text = CLIPTextModel(clip.config.text_config)
    sd = ckpt.canonical_text_keys({k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")})
    text.load_state_dict(ckpt.model_text_keys(sd, text))
    return text.eval()


def train_unet(data, vae, text_encoder, plan, out):
    """eps-prediction on posterior samples of the VAE latents, t uniform over 0..999, each sample's squared error
    weighted by min(SNR, gamma) / SNR (min-SNR-gamma, arXiv 2303.09556): nearly-clean timesteps, which only
    polish details, stop dominating the loss, and the shapes the world is made of are learned sooner."""
    torch.manual_seed(plan.seed + 3)
    model = unet_lib.UNet(unet_lib.toy())
    ema = unet_lib.UNet(unet_lib.toy())
    ema.load_state_dict(model.state_dict())
    tokenizer, ab = ckpt.load_tokenizer(), sample.alphas_cumprod()
    with torch.no_grad():                               # encode every image once; sample the posterior per step
        stats = [vae.encode(data.images[i:i + 256].float() / 127.5 - 1) for i in range(0, len(data.images), 256)]
        mean, std = torch.cat([m for m, _ in stats]), torch.cat([torch.exp(0.5 * lv) for _, lv in stats])
    scale = vae.config.scale_factor

    def loss_fn(step):
        idx, _, captions = data.batch(step, plan.unet_batch, plan.seed + 3)
        g = torch.Generator().manual_seed(plan.seed * 104729 + step)
        captions = ["" if torch.rand(1, generator=g).item() < 0.1 else c for c in captions]  # CFG dropout
        with torch.no_grad():
            ctx = text_encoder(ckpt.tokenize(tokenizer, captions)).last_hidden_state
        x0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ab[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps      # DDPM eq. 4
        snr = ab[t] / (1 - ab[t])
        weight = snr.clamp(max=plan.min_snr) / snr
        return (weight * (model(x_t, t, ctx) - eps).pow(2).mean(dim=(1, 2, 3))).mean()

    fit("unet", model, loss_fn, plan.unet_steps, plan.unet_lr, out, ema=ema)
    return ema.eval()


def train_dino(data, plan, out):
    """A ViT trained without labels: two augmented views must find each other in the batch (NT-Xent). The views are
    crops of one object in two renders that differ in background and pose (`Data.twins`), so that the embedding
    tells objects apart rather than backgrounds, as subject retrieval needs."""
    torch.manual_seed(plan.seed + 5)
    model = ViTModel(dino_config(), add_pooling_layer=False)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    both = torch.nn.ModuleDict({"vit": model, "head": head})

    twins = data.twins() if plan.dino_twins else None

    def loss_fn(step):
        idx, x, _ = data.batch(step, plan.dino_batch, plan.seed + 5)
        g = torch.Generator().manual_seed(plan.seed * 15485863 + step)
        other = x if twins is None else twins[idx].float() / 127.5 - 1
        views = torch.cat([augment(x, g), augment(other, g)])
        z = F.normalize(head(model(pixel_values=views).last_hidden_state[:, 0]), dim=-1)
        sim = z @ z.T / 0.1
        sim.fill_diagonal_(float("-inf"))
        B = len(x)
        target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
        return F.cross_entropy(sim, target)

    fit("dino", both, loss_fn, plan.dino_steps, plan.clip_lr, out)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# export and loading


def half(sd):
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def export_sd(sd_model, folder=ASSETS, meta=None):
    """The SD part as one fp16 file in the CompVis layout (it loads with ckpt.load_sd)."""
    ckpt.save_compvis(sd_model, Path(folder) / SD_FILE.name, dtype=torch.float16, metadata=meta)


def export_evaluators(eval_clip, dino, folder=ASSETS, meta=None):
    """The evaluators as one fp16 file, with their transformers configs in its metadata."""
    tensors = {**{"clip." + k: v for k, v in eval_clip.state_dict().items()},
               **{"dino." + k: v for k, v in dino.state_dict().items()}}
    meta = {"format": "pt", "clip_config": json.dumps(eval_clip.config.to_dict()),
            "dino_config": json.dumps(dino.config.to_dict()), **(meta or {})}
    ckpt.atomic_save(half(tensors), Path(folder) / EVAL_FILE.name, meta)


# --------------------------------------------------------------------------------------------------------------------
# what the pretrained world knows


def attribute_prompts(scene):
    """Zero-shot candidates for one image: every class; every color of its true class; every context of it."""
    phrase = lambda ctx: world.caption(world.Scene(scene.cls, "red", "plain", ctx)).split("red ", 1)[1]
    return {"class": [f"a photo of a {c}" for c in world.CLASSES],
            "color": [f"a photo of a {c} {scene.cls}" for c in world.COLORS],
            "context": [f"a photo of a {phrase(ctx)}" for ctx in world.CONTEXTS]}


def heldout_scenes(n=64, seed=0):
    """n scenes whose (class, color, context) triple was never in pretraining, with their canonical captions."""
    rng = random.Random(seed)
    scenes = [world.Scene(t.cls, t.color, "plain", t.context) for t in
              (world.sample_scene(rng, split="heldout") for _ in range(n))]
    return scenes, [world.caption(s) for s in scenes]


def attribute_accuracy(ev, images, scenes):
    """Zero-shot accuracy of the evaluation CLIP on class, color and context of images showing `scenes`. The
    candidate prompts depend only on the class, so their text embeddings are computed once per class."""
    img = metrics.clip_image_embeds(ev, images)
    truth = {"class": [world.CLASSES.index(s.cls) for s in scenes],
             "color": [list(world.COLORS).index(s.color) for s in scenes],
             "context": [world.CONTEXTS.index(s.context) for s in scenes]}
    text = {}
    for s in scenes:
        if s.cls not in text:
            text[s.cls] = {k: metrics.clip_text_embeds(ev, c) for k, c in attribute_prompts(s).items()}
    return {k: sum(int((img[i] @ text[s.cls][k].T).argmax() == truth[k][i]) for i, s in enumerate(scenes))
            / len(scenes) for k in truth}


def generate_heldout(sd_model, prompts, steps=50, guidance_scale=7.5, seed=0):
    """One sample per prompt, 16 prompts per batch, batch i seeded with seed + 16 i."""
    images = []
    for i in range(0, len(prompts), 16):
        images += sample.generate(sd_model, prompts[i:i + 16], seed=seed + i, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=SIZE, width=SIZE)
    return images


@torch.no_grad()
def reconstruct(sd_model, images):
    """Each image through the VAE and back (the posterior mean, no sampling), as PIL images."""
    x = metrics.to_tensor(images) * 2 - 1
    return [im for i in range(0, len(x), 64)
            for im in sample.decode_images(sd_model, sd_model.vae.encode_latents(x[i:i + 64], sample=False))]


def psnr_mae(real, recon):
    """PSNR in dB over all pixels of a set of images, and their mean absolute error in 8-bit levels (0..255)."""
    a, b = metrics.to_tensor(real), metrics.to_tensor(recon)
    mse = (a - b).pow(2).mean().item()
    return (10 * math.log10(1 / mse) if mse > 0 else math.inf), 255 * (a - b).abs().mean().item()


def retrieval(query, gallery, query_labels, gallery_labels, exclude=None):
    """Share of queries whose most similar gallery item (cosine of unit embeddings) carries the query's label, and
    the share a random pick would get (chance). exclude[i] is a gallery index query i may not pick (itself, in a
    leave-one-out search). Exact ties share the credit, so identical embeddings score exactly chance."""
    sim = query @ gallery.T
    allowed = torch.ones_like(sim, dtype=torch.bool)
    if exclude is not None:
        allowed[torch.arange(len(query)), torch.as_tensor(exclude)] = False
    sim = sim.masked_fill(~allowed, float("-inf"))
    same = torch.tensor([[q == g for g in gallery_labels] for q in query_labels])
    tied = sim == sim.max(dim=1, keepdim=True).values
    hit = ((tied & same).sum(1) / tied.sum(1)).mean().item()
    chance = ((allowed & same).sum(1) / allowed.sum(1)).mean().item()
    return hit, chance


def subject_references():
    """Every toy subject's reference pictures as rendered by the world, and the subject each shows."""
    images, labels = [], []
    for name in world.SUBJECTS:
        for ctx, s in world.references(name):
            images.append(world.render_subject(name, ctx, s)[0])
            labels.append(name)
    return images, labels


def ceiling_chain(ev, scenes, real, recon, generated, refs, ref_labels, refs_recon, drawn):
    """Where quality is lost, stage by stage, on the same scenes: the real renders (the ceiling of everything), their
    VAE reconstructions (what any UNet can at best draw), the UNet's samples for the scenes' captions, and for
    subjects, images drawn for each (`drawn`: {row name: (images, subject labels)}, e.g. "a photo of a <class>"
    before personalization and "a photo of sks <class>" after). Zero-shot accuracy reads class, color and context
    with the evaluation CLIP; subject retrieval asks whether an image's nearest subject reference (DINO stand-in,
    CLIP-I) is of its own subject: leave-one-out among the references themselves, against the real references
    for reconstructions and samples. Returns {row: {metric: value}}; a metric a row does not measure is absent."""
    embed = {"dino": metrics.dino_embeds, "clip_i": metrics.clip_image_embeds}
    gallery = {k: f(ev, refs) for k, f in embed.items()}
    own = list(range(len(refs)))

    def subject_scores(images, labels, exclude=None):
        scores = {}
        for k, f in embed.items():
            scores[f"subject_{k}"], scores[f"subject_{k}_chance"] = retrieval(
                gallery[k] if images is refs else f(ev, images), gallery[k], labels, ref_labels, exclude)
        return scores

    psnr, mae = psnr_mae(real, recon)
    rows = {"real renders": {**attribute_accuracy(ev, real, scenes), **subject_scores(refs, ref_labels, own)},
            "VAE reconstructions": {"psnr": psnr, "mae": mae, **attribute_accuracy(ev, recon, scenes),
                                    **subject_scores(refs_recon, ref_labels, own)},
            "UNet samples": attribute_accuracy(ev, generated, scenes)}
    for name, (images, labels) in drawn.items():
        rows[name] = subject_scores(images, labels)
    rows["chance"] = {"class": 1 / len(world.CLASSES), "color": 1 / len(world.COLORS),
                      "context": 1 / len(world.CONTEXTS),
                      "subject_dino": rows["real renders"]["subject_dino_chance"],
                      "subject_clip_i": rows["real renders"]["subject_clip_i_chance"]}
    return rows


def draw_subjects(sd_model, prompt, n_images, steps, guidance_scale, seed, personalized=None, base_path=None):
    """n_images samples of `prompt` (formatted with the class) per subject, and the subject of each. With
    `personalized` (a train.py output path with {subject} in it), each subject's own run is loaded into a fresh
    copy of the base model at `base_path`; subjects without a run are left out."""
    images, labels = [], []
    for k, (name, subj) in enumerate(world.SUBJECTS.items()):
        model = sd_model
        if personalized is not None:
            path = Path(personalized.format(subject=name))
            if not path.is_file():
                continue
            model = ckpt.load_personalized(ckpt.load_sd(base_path), path, base_path=base_path)
        images += sample.generate(model, prompt.format(subj.cls), seed=seed + 100 + k, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                                  num_images_per_prompt=n_images)
        labels += [name] * n_images
    return images, labels


def report(sd_model, ev, n=128, n_subject=8, steps=50, guidance_scale=7.5, seed=0, grid_path=None,
           personalized=None, base_path=None, vae_grid_path=None):
    """The pretrained world's numbers: the ceiling chain (see `ceiling_chain`) on n held-out scenes (prompts whose
    class/color/context triple was never in pretraining), and how close "a photo of a <class>" samples come to
    each subject (subject fidelity) against the references' fidelity to each other."""
    scenes, prompts = heldout_scenes(n, seed)
    real = [world.render(s, seed=10_000 + i)[0] for i, s in enumerate(scenes)]
    recon = reconstruct(sd_model, real)
    fake = generate_heldout(sd_model, prompts, steps, guidance_scale, seed)
    refs, ref_labels = subject_references()
    sampling = dict(n_images=n_subject, steps=steps, guidance_scale=guidance_scale, seed=seed)
    drawn = {"untrained, \"a photo of a <class>\"": draw_subjects(sd_model, "a photo of a {}", **sampling)}
    if personalized is not None:
        drawn["personalized, \"a photo of sks <class>\""] = draw_subjects(
            sd_model, "a photo of sks {}", **sampling, personalized=personalized, base_path=base_path)
    chain = ceiling_chain(ev, scenes, real, recon, fake, refs, ref_labels, reconstruct(sd_model, refs), drawn)
    class_images, class_labels = drawn["untrained, \"a photo of a <class>\""]
    subjects = {}
    for name in world.SUBJECTS:
        r = [im for im, lab in zip(refs, ref_labels) if lab == name]
        gen = [im for im, lab in zip(class_images, class_labels) if lab == name]
        ci, di = metrics.clip_image_embeds(ev, r), metrics.dino_embeds(ev, r)
        subjects[name] = {"refs_clip_i": metrics.mean_pairwise_cosine(ci, ci, exclude_self=True),
                          "refs_dino": metrics.mean_pairwise_cosine(di, di, exclude_self=True),
                          "class_prompt_clip_i": metrics.clip_i(ev, gen, r),
                          "class_prompt_dino": metrics.dino(ev, gen, r)}
    if grid_path is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        sample.labelled_grid(list(zip(fake[:32], prompts[:32]))).save(grid_path)
    if vae_grid_path is not None:                   # renders above their reconstructions, subjects included
        firsts = [ref_labels.index(name) for name in list(world.SUBJECTS)[::len(world.SUBJECTS) // 8][:8]]
        refs_recon = reconstruct(sd_model, [refs[i] for i in firsts])
        cells = [(im, "render") for im in real[:8]] + [(im, "VAE") for im in recon[:8]]
        cells += [(refs[i], ref_labels[i]) for i in firsts] + [(im, "VAE") for im in refs_recon]
        Path(vae_grid_path).parent.mkdir(parents=True, exist_ok=True)
        sample.labelled_grid(cells, cols=8, zoom=3).save(vae_grid_path)
    return {"chain": chain, "subjects": subjects,
            "settings": dict(n=n, steps=steps, guidance_scale=guidance_scale, seed=seed, n_subject=n_subject,
                             personalized=personalized, base=None if base_path is None else str(base_path))}


CHAIN_COLUMNS = {"psnr": "VAE PSNR (dB)", "mae": "VAE error (/255)", "class": "class", "color": "color",
                 "context": "context", "subject_dino": "subject by DINO", "subject_clip_i": "subject by CLIP-I"}


def chain_markdown(chain):
    """The ceiling chain as one markdown table; "-" where a row does not measure a column."""
    def cell(k, v):
        if v is None:
            return "-"
        return f"{v:.1f}" if k in ("psnr", "mae") else f"{100 * v:.1f}%"
    lines = ["| images | " + " | ".join(CHAIN_COLUMNS.values()) + " |", "|---" * (len(CHAIN_COLUMNS) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(k, m.get(k)) for k in CHAIN_COLUMNS) + " |" for row, m in chain.items()]
    return "\n".join(lines)


def report_markdown(r):
    keys = ("refs_clip_i", "class_prompt_clip_i", "refs_dino", "class_prompt_dino")
    lines = [chain_markdown(r["chain"]), "",
             "| subject | CLIP-I refs vs refs | CLIP-I class prompt | DINO refs vs refs | DINO class prompt |",
             "|---|---|---|---|---|"]
    mean = {k: sum(s[k] for s in r["subjects"].values()) / len(r["subjects"]) for k in keys}
    for name, m in list(r["subjects"].items()) + [("**mean**", mean)]:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


STAGES = ("vae", "clip", "unet", "eval_clip", "dino")
SD_STAGES, EVAL_STAGES = STAGES[:3], STAGES[3:]


STAGE_NAMES = {"vae": "the autoencoder", "clip": "the conditioning CLIP", "unet": "the UNet",
               "eval_clip": "the evaluation CLIP", "dino": "the DINO stand-in"}


def pretrain(plan, out, stages=STAGES, export_to=ASSETS):
    """Train the named stages (each resumes from its checkpoint in `out`) and take the others from the shipped
    files: the evaluators never depend on the SD model, and the UNet needs only the VAE and the conditioning text
    tower. Writes the SD file if an SD stage ran and the evaluators' file if an evaluator did, into `export_to`
    (None: nowhere), each recording the plan that made it. Returns (sd_model, eval_clip, dino, seconds per stage)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose among {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    seconds, t0 = {}, time.time()
    data = Data(plan.n_images, plan.seed, plan.named_share)
    seconds["render"] = time.time() - t0
    parts = {}                                          # what each stage makes ("clip": its text tower), or shipped
    if set(SD_STAGES) - set(stages):
        shipped = ckpt.load_sd(SD_FILE)
        parts.update(vae=shipped.vae, clip=shipped.text_encoder, unet=shipped.unet)
    if set(EVAL_STAGES) - set(stages):
        parts["eval_clip"], parts["dino"] = metrics.read_toy_evaluators(EVAL_FILE)
    trainers = {"vae": lambda: train_vae(data, plan, out),
                "clip": lambda: text_tower(train_clip(data, plan, out)),
                "unet": lambda: train_unet(data, parts["vae"], parts["clip"], plan, out),
                "eval_clip": lambda: train_clip(data, plan, out, name="eval_clip", seed_offset=4, vision_width=96,
                                                vision_layers=4),
                "dino": lambda: train_dino(data, plan, out)}
    for k, name in enumerate(STAGES):
        head = f"[{k + 1}/{len(STAGES)}] {name}:"
        if name not in stages:
            print(f"{head} taken from the shipped files", flush=True)
            continue
        print(f"{head} training {STAGE_NAMES[name]}, {getattr(plan, name + '_steps')} steps", flush=True)
        t = time.time()
        parts[name] = trainers[name]()
        seconds[name] = time.time() - t
        print(f"    {name} done in {seconds[name]:.0f} s", flush=True)
    sd_model = ckpt.StableDiffusion(parts["unet"], parts["vae"], parts["clip"], ckpt.load_tokenizer())
    if export_to is not None:
        meta = lambda group: {"qdp.toy_plan": json.dumps(asdict(plan)),  # noqa: E731
                              "qdp.toy_stages": ",".join(s for s in stages if s in group)}
        if set(stages) & set(SD_STAGES):
            export_sd(sd_model, export_to, meta(SD_STAGES))
        if set(stages) & set(EVAL_STAGES):
            export_evaluators(parts["eval_clip"], parts["dino"], export_to, meta(EVAL_STAGES))
    seconds["total"] = time.time() - t0
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), flush=True)
    return sd_model, parts["eval_clip"], parts["dino"], seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Pretrain the toy world's models (resumable).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="folder for resumable stage checkpoints (and for "
                        "--report's report.json and report.md)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (smoke runs)")
    parser.add_argument("--no_export", action="store_true", help="do not overwrite the shipped models in assets/toy")
    parser.add_argument("--export_to", default=str(ASSETS), help="where the trained files go (not with --no_export)")
    parser.add_argument("--set", default="", help="override fields of the plan, e.g. unet_steps=1500,named_share=0 "
                        "(a reduced-scale experiment)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of the stages to train; the others are taken from the shipped "
                        "files")
    parser.add_argument("--report", action="store_true",
                        help="skip training: measure the shipped models (zero-shot accuracy, subject fidelity)")
    parser.add_argument("--grid", default="docs/toy_heldout.png", help="with --report: where to save a sample grid")
    parser.add_argument("--vae_grid", default="docs/toy_vae.png",
                        help="with --report: where to save renders above their VAE reconstructions")
    parser.add_argument("--personalized", default=None,
                        help="with --report: train.py outputs, one per subject, with {subject} in the path (e.g. "
                        "runs/full/{subject}/personalized.safetensors), for the chain's personalized row; "
                        "unset: no such row")
    parser.add_argument("--personalized_base", default=str(SD_FILE),
                        help="with --personalized: the base model those runs started from")
    args = parser.parse_args()
    if args.personalized is not None and "{subject}" not in args.personalized:
        parser.error("--personalized needs {subject} in the path: one train.py output per subject")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    sample.pick_threads()
    if args.report:
        result = report(ckpt.load_sd(SD_FILE), metrics.load_evaluators(), grid_path=args.grid,
                        personalized=args.personalized, base_path=args.personalized_base,
                        vae_grid_path=args.vae_grid)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(json.dumps(result, indent=2))
        (Path(args.out) / "report.md").write_text(report_markdown(result) + "\n")
        print(report_markdown(result))
    else:
        stages = [x for x in args.stages.split(",") if x]
        if not stages or any(x not in STAGES for x in stages):
            parser.error(f"--stages takes a comma-separated list of {', '.join(STAGES)}")
        plan = Plan().scaled(args.scale)
        types = {f.name: f.type for f in fields(Plan)}
        try:
            overrides = dict(kv.split("=", 1) for kv in args.set.split(",") if kv)
            read = {int: int, float: float, bool: lambda v: v.lower() in ("1", "true")}
            plan = replace(plan, **{k: read[types[k]](v) for k, v in overrides.items()})
        except (KeyError, ValueError) as e:
            parser.error(f"--set takes FIELD=VALUE pairs of {', '.join(types)}: {e}")
        pretrain(plan, Path(args.out), stages, None if args.no_export else Path(args.export_to))
