"""Evaluation of subject-driven generation: CLIP-I, CLIP-T and DINO, as DreamBooth defines them, and zero-shot
attribute accuracy.

DreamBooth (arXiv 2208.12242, sec. 4.1) scores a personalized model on two axes:
- subject fidelity: CLIP-I, the mean cosine similarity between CLIP (arXiv 2103.00020) image embeddings of every
  generated image and every reference photo; DINO, the same with the CLS embedding of a self-supervised ViT
  (DINO ViT-S/16, arXiv 2104.14294), which separates instances of one class better than CLIP does;
- prompt fidelity: CLIP-T, the mean cosine similarity between each generated image and its own prompt.
The evaluators are CLIP ViT-B/32 and DINO ViT-S/16 from folders the user supplies (nothing is downloaded), or, by
default, the toy world's own CLIP and SimCLR-trained ViT (toyworld/toy.py), which stand in for them on a CPU.

    python eval.py --images out/samples --references assets/toy/dreambooth/mug_star --prompt "a photo of sks mug"
"""
import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

import ckpt
import sample
import train

METRIC_NAMES = {"clip_i": "CLIP-I", "local_clip_i": "local CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}


@dataclass
class Evaluators:
    """The two image encoders and how each wants its pixels (side, per-channel mean and std)."""
    clip: CLIPModel
    dino: ViTModel
    tokenizer: CLIPTokenizer
    clip_pre: tuple = (224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    dino_pre: tuple = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


TOY_EVALUATORS = Path(__file__).resolve().parent / "assets" / "toy" / "toy_eval.safetensors"   # made by toyworld/toy.py


def read_toy_evaluators(path=TOY_EVALUATORS):
    """(CLIPModel, ViTModel) of the toy world, float32, eval mode, from the file toyworld/toy.py writes: the tensors
    under "clip." and "dino.", and the transformers configs in its metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    clip = CLIPModel(CLIPConfig(**json.loads(meta["clip_config"])))
    dino = ViTModel(ViTConfig(**json.loads(meta["dino_config"])), add_pooling_layer=False)
    clip.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("clip.")})
    dino.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("dino.") and ".pooler." not in k})
    return clip.eval(), dino.eval()


def load_evaluators(clip=None, dino=None):
    """Real evaluators from local folders (a transformers CLIPModel and ViTModel, with their preprocessor
    configs), or the toy world's when none is given."""
    if clip is None and dino is None:
        toy_clip, toy_dino = read_toy_evaluators()
        half = (toy_clip.config.vision_config.image_size, (0.5,) * 3, (0.5,) * 3)  # they see pixels in [-1, 1]
        return Evaluators(toy_clip, toy_dino, ckpt.load_tokenizer(), half, half)
    if clip is None or dino is None:
        raise ValueError("give both --clip and --dino folders, or neither for the toy evaluators")
    ev = Evaluators(CLIPModel.from_pretrained(clip, local_files_only=True).eval(),
                    ViTModel.from_pretrained(dino, local_files_only=True, add_pooling_layer=False).eval(),
                    CLIPTokenizer.from_pretrained(clip, local_files_only=True))
    for name, folder in (("clip_pre", clip), ("dino_pre", dino)):
        cfg = Path(folder) / "preprocessor_config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            size = c.get("crop_size", c.get("size", 224))
            size = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size
            setattr(ev, name, (size, tuple(c["image_mean"]), tuple(c["image_std"])))
    return ev


def to_tensor(images):
    """PIL images or a (B,3,H,W) tensor in [0,1] -> float tensor (B,3,H,W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in images])


def prepare(images, pre):
    """Resize the shorter side to `size`, centre-crop a square, normalize: what CLIP's and DINO's processors do."""
    size, mean, std = pre
    if not isinstance(images, torch.Tensor) and len({im.size for im in images}) > 1:   # e.g. subject crops
        return torch.cat([prepare([im], pre) for im in images])
    x = to_tensor(images)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def clip_image_embeds(ev, images):
    """Unit-norm CLIP image embeddings (B, D)."""
    pooled = ev.clip.vision_model(pixel_values=prepare(images, ev.clip_pre)).pooler_output
    return F.normalize(ev.clip.visual_projection(pooled), dim=-1)


@torch.no_grad()
def clip_text_embeds(ev, prompts):
    """Unit-norm CLIP text embeddings (B, D) of prompts padded as SD pads them."""
    ids = ckpt.tokenize(ev.tokenizer, prompts)
    pooled = ev.clip.text_model(input_ids=ids).pooler_output
    return F.normalize(ev.clip.text_projection(pooled), dim=-1)


@torch.no_grad()
def dino_embeds(ev, images):
    """Unit-norm DINO embeddings (B, D): the CLS token of the last layer."""
    return F.normalize(ev.dino(pixel_values=prepare(images, ev.dino_pre)).last_hidden_state[:, 0], dim=-1)


def mean_pairwise_cosine(a, b, exclude_self=False):
    """Mean of cos(a_i, b_j) over all pairs (unit vectors); with exclude_self (a is b) the diagonal is left out."""
    sim = a @ b.T
    if exclude_self:
        n = len(a)
        return ((sim.sum() - sim.diagonal().sum()) / (n * n - n)).item()
    return sim.mean().item()


def reference_fidelity(ev, references):
    """CLIP-I and DINO of a subject's references against each other (each pair once, no image against itself): the
    most a generated image can be expected to score."""
    return {"clip_i": mean_pairwise_cosine(*[clip_image_embeds(ev, references)] * 2, exclude_self=True),
            "dino": mean_pairwise_cosine(*[dino_embeds(ev, references)] * 2, exclude_self=True)}


def clip_i(ev, generated, references):
    """CLIP-I: mean cosine between the CLIP embeddings of every generated and every reference image."""
    return mean_pairwise_cosine(clip_image_embeds(ev, generated), clip_image_embeds(ev, references))


def clip_t(ev, generated, prompts):
    """CLIP-T: mean cosine between each generated image and the prompt it was generated from."""
    return (clip_image_embeds(ev, generated) * clip_text_embeds(ev, prompts)).sum(-1).mean().item()


def dino(ev, generated, references):
    """DINO: mean cosine between the DINO embeddings of every generated and every reference image."""
    return mean_pairwise_cosine(dino_embeds(ev, generated), dino_embeds(ev, references))


def zero_shot(ev, images, candidates):
    """Index of the best-matching prompt for each image. `candidates` is one list of prompts shared by all images,
    or one list per image (e.g. color prompts that name each image's true class)."""
    img = clip_image_embeds(ev, images)
    if isinstance(candidates[0], str):
        return (img @ clip_text_embeds(ev, candidates).T).argmax(-1)
    return torch.stack([(img[i] @ clip_text_embeds(ev, c).T).argmax() for i, c in enumerate(candidates)])


def read_images(folder, flag="--references"):
    """Every readable image in a folder, sorted by name: ckpt.read_images, the reader train.py trains from, so a photo
    is scored as it was trained on (EXIF rotation applied, unreadable files skipped with a warning)."""
    return ckpt.read_images(folder, flag)


# --------------------------------------------------------------------------------------------------------------------
# local CLIP-I: CLIP-I on the subject's crop


def word_positions(tokenizer, prompt, word):
    """Token positions (in SD's 77-token sequence, start token at 0) of the last occurrence of `word` in prompt."""
    ids = tokenizer(prompt).input_ids
    piece = tokenizer(" " + word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(piece), 0, -1):
        if ids[i:i + len(piece)] == piece:
            return list(range(i, i + len(piece)))
    raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")


@torch.no_grad()
def attention_map(sd, image, prompt, word, timesteps=(300, 500, 700), seed=0):
    """Where the model looks for `word`: the image is encoded, noised to each of `timesteps`, denoised once with the
    prompt, and the cross-attention probabilities of the word's tokens are averaged over heads, layers (each map
    upsampled to the latent size) and timesteps. Returns (h, w) in latent pixels, summing to 1."""
    x = to_tensor([image]).to(next(sd.vae.parameters())) * 2 - 1            # the model's device and dtype
    z = sd.vae.encode_latents(x, sample=False)
    ctx = sample.encode_prompts(sd, [prompt])
    pos = word_positions(sd.tokenizer, prompt, word)
    maps, hooks = [], []

    def grab(attn, args):
        h, c = args[0], args[1]
        q = attn.to_q(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_k(c).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)   # (1, heads, N, 77)
        n = probs.shape[2]
        hh = int(round((n * z.shape[-2] / z.shape[-1]) ** 0.5))
        m = probs[0, :, :, pos].sum(-1).mean(0).reshape(1, 1, hh, n // hh)
        maps.append(F.interpolate(m, size=z.shape[-2:], mode="bilinear", align_corners=False)[0, 0])

    for name, module in sd.unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(module.register_forward_pre_hook(grab))
    try:
        ab = sample.alphas_cumprod().to(z.device)
        g = torch.Generator().manual_seed(seed)
        for t in timesteps:
            noise = torch.randn(z.shape, generator=g).to(z)
            a = ab[t]
            sd.unet((a.sqrt() * z + (1 - a).sqrt() * noise).to(z), torch.tensor([t], device=z.device), ctx)
    finally:
        for h in hooks:
            h.remove()
    m = torch.stack(maps).float().mean(0)
    return m / m.sum()


def box_from_map(m, size, keep=0.5):
    """The bounding box (x0, y0, x1, y1) in image pixels of the map's region above min + keep x (max - min)."""
    m = F.interpolate(m[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    ys, xs = torch.nonzero(m >= m.min() + keep * (m.max() - m.min()), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a, b):
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def subject_crop(sd, image, prompt, word, margin=0.1):
    """The image cropped to the square around the model's attention box for `word`, grown by `margin` per side."""
    x0, y0, x1, y1 = box_from_map(attention_map(sd, image, prompt, word), image.size)
    side = round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    return image.crop((left, top, left + side, top + side))


def crop_iou(sd, root, per_subject=None):
    """How well the attention box finds the object: mean IoU with the toy subjects' ground-truth boxes (boxes.json
    of the toy dataset) over their reference photos, and the same for the best fixed central box as the baseline."""
    root = Path(root)
    boxes = json.loads((root / "boxes.json").read_text())
    classes, _, _ = read_prompts_and_classes(root / "prompts_and_classes.txt")
    found, central = [], []
    for s, files in boxes.items():
        for f, truth in list(files.items())[:per_subject]:
            im = Image.open(root / s / f).convert("RGB")
            m = attention_map(sd, im, f"a photo of a {classes[s]}", classes[s])
            found.append(iou(box_from_map(m, im.size), truth))
            w, h = im.size
            central.append(iou((w // 4, h // 4, 3 * w // 4, 3 * h // 4), truth))
    return sum(found) / len(found), sum(central) / len(central), len(found)


def local_clip_i(ev, sd, generated, prompts, word, references):
    """Local CLIP-I: CLIP-I between the subject crops of the generated images (the model's own attention to the
    class word, subject_crop) and the reference photos, which show the subject large already. Backgrounds that
    match or differ from the references then count for nothing; only the subject does."""
    crops = [subject_crop(sd, im, p, word) for im, p in zip(generated, prompts)]
    return clip_i(ev, crops, references)


# --------------------------------------------------------------------------------------------------------------------
# the DreamBooth protocol: subjects x prompt templates x images per prompt


PROMPT_LINE = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?$")


def read_prompts_and_classes(path):
    """(classes {subject: class}, object templates, live templates) from a DreamBooth prompts_and_classes.txt;
    templates are format strings: t.format("sks", "dog")."""
    classes, prompts, section = {}, {"Object Prompts": [], "Live Subject Prompts": []}, None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line in prompts:
            section = line
        elif m := PROMPT_LINE.match(line):
            prompts[section].append(m.group(1))
        elif section is None and "," in line and line != "subject_name,class":
            name, cls = line.split(",", 1)
            classes[name] = cls
    return classes, prompts["Object Prompts"], prompts["Live Subject Prompts"]


def dataset_subjects(root):
    """{subject: class} and the object / live templates of a DreamBooth-layout dataset (the real one: root/dataset/
    holds the folders; the toy one: root itself); every listed subject must have its folder."""
    root = Path(root)
    root = root / "dataset" if (root / "dataset" / "prompts_and_classes.txt").is_file() else root
    if not (root / "prompts_and_classes.txt").is_file():
        raise SystemExit(f"error: no prompts_and_classes.txt in {root}; pass a DreamBooth-layout dataset folder")
    classes, objects, live = read_prompts_and_classes(root / "prompts_and_classes.txt")
    if not classes or not (objects or live):
        raise SystemExit(f"error: {root / 'prompts_and_classes.txt'} lists no " + ("subjects" if not classes else
                         "prompt templates") + "; write it in the DreamBooth dataset's layout")
    missing = [s for s in classes if not (root / s).is_dir()]
    if missing:
        raise SystemExit(f"error: {root} lists subjects without a folder: {', '.join(missing)}")
    return root, classes, objects, live


def templates_for(cls, objects, live):
    """DreamBooth gives dogs and cats the live-subject prompts and every other class the object prompts."""
    return live if cls in ("dog", "cat") else objects


def evaluate_subject(sd, ev, references, cls, templates, token="sks", n_images=4, seed=0, per_image=False,
                     batch_images=1, eta=0.0, **sampling):
    """Sample every template n_images times (template i from seed + i) and score the lot against the references.
    `batch_images` images (whole templates, at least one) are denoised in one batch, each template from its own x_T:
    the same images up to float rounding, which on a W4A8 model can flip activation roundings and move some images
    though not the scores (README, "Scoring in batches"); faster on small models, bounded by memory on SD v1.
    CLIP-T takes the prompt without the identifier ("a dog in the snow"), which the evaluation CLIP never saw;
    local CLIP-I crops each image to where the model attends to the class word of its own prompt. With ev=None the
    images are only drawn (scores {}); with per_image, scores["per_image"] holds each image's CLIP-I and DINO (its
    mean over the references), whose means are the scores, for paired comparisons between models."""
    shown = [tpl.format(token, cls) for tpl in templates for _ in range(n_images)]  # what the model was given
    prompts = [" ".join(tpl.format("", cls).split()) for tpl in templates for _ in range(n_images)]  # for CLIP-T
    images, per_batch = [], max(1, batch_images // n_images)       # templates sampled together
    for i in range(0, len(templates), per_batch):
        chunk = [t.format(token, cls) for t in templates[i:i + per_batch]]
        if len(chunk) == 1:
            images += sample.generate(sd, chunk, seed=seed + i, num_images_per_prompt=n_images, eta=eta, **sampling)
            continue
        if eta:
            raise ValueError("batch_images must not exceed n_images with eta > 0 (each prompt draws its own eta "
                             "noise); lower it")
        noise = torch.cat([sample.initial_noise(sd, n_images, seed + i + j, sampling.get("height"))
                           for j in range(len(chunk))])
        images += sample.generate(sd, chunk, num_images_per_prompt=n_images, latents=noise, **sampling)
    if ev is None:
        return {}, images, prompts
    scores = {"clip_i": clip_i(ev, images, references),
              "local_clip_i": local_clip_i(ev, sd, images, shown, cls, references),
              "clip_t": clip_t(ev, images, prompts), "dino": dino(ev, images, references)}
    if per_image:
        scores["per_image"] = {
            "clip_i": (clip_image_embeds(ev, images) @ clip_image_embeds(ev, references).T).mean(1).tolist(),
            "dino": (dino_embeds(ev, images) @ dino_embeds(ev, references).T).mean(1).tolist()}
    return scores, images, prompts


def score_model(base, scales, ev, references, cls, templates, token="sks", n_images=4, seed=0, device="cpu",
                per_image=False, batch_images=1, dtype=torch.float32, **sampling):
    """The one path from files to scores that qdp.py, studies.py and `eval.py --dataset` share: load `base` (in
    `dtype`: float16 halves a GPU's memory and time), put train.py's `scales` (PEQA, S2 experts or full weights; None:
    the base as it is) into it, then evaluate_subject. Returns (scores, images, prompts)."""
    sd = ckpt.load_sd(base, device=device, dtype=dtype)
    if scales is not None:
        ckpt.load_personalized(sd, scales, base_path=base)
    return evaluate_subject(sd, ev, references, cls, templates, token, n_images, seed, per_image, batch_images,
                            **sampling)


def confidence_interval(values, level=0.95, n_boot=10_000, seed=0):
    """Mean and the percentile-bootstrap interval of the mean over subjects (resampling subjects)."""
    v = np.sort(np.asarray(values, dtype=np.float64))        # sorted: the interval does not depend on order
    means = np.random.default_rng(seed).choice(v, size=(n_boot, len(v))).mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def summarize(results):
    """{metric: (mean, ci_low, ci_high)} over the subjects of {subject: {metric: value}}."""
    metrics = sorted({k for r in results.values() for k in r})
    return {k: confidence_interval([r[k] for r in results.values()]) for k in metrics}


def markdown(results, summary):
    keys = list(summary)
    lines = ["| subject | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for s, r in results.items()]
    lines.append("| **mean (95% CI)** | " + " | ".join(f"**{m:.3f}** ({lo:.3f}-{hi:.3f})"
                                                       for m, lo, hi in summary.values()) + " |")
    return "\n".join(lines)


def run(args):
    """The protocol over this process's share of the subjects; under torchrun, shards are gathered on rank 0,
    which writes results.json, results.md and one image grid per subject."""
    rank, world_size = 0, 1
    if "RANK" in __import__("os").environ:
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    root, classes, objects, live = dataset_subjects(args.dataset)
    subjects = list(classes) if args.subjects == "all" else args.subjects.split(",")
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise SystemExit(f"error: unknown subjects {', '.join(unknown)}; {root} has {', '.join(classes)}")
    if args.ckpt and not Path(args.ckpt).exists():
        raise SystemExit(f"error: --ckpt {args.ckpt}: no such file or folder")
    lacking = [args.scales.format(subject=s) for s in subjects if args.scales
               and not Path(args.scales.format(subject=s)).is_file()]
    if lacking:                                  # before any sampling, not at the subject that lacks it
        raise SystemExit(f"error: --scales: {len(lacking)} of {len(subjects)} subjects have no file (e.g. "
                         f"{lacking[0]}); train them first, or pass --subjects")
    ev = load_evaluators(args.clip, args.dino)
    out = Path(args.out)
    mine, results = subjects[rank::world_size], {}
    for name in mine:
        templates = templates_for(classes[name], objects, live)[:args.n_prompts]
        scores, images, prompts = score_model(
            args.ckpt or ckpt.TOY_CKPT, args.scales.format(subject=name) if args.scales else None, ev,
            read_images(root / name), classes[name], templates, args.token, args.n_images, args.seed, args.device,
            batch_images=args.batch_images or args.n_images, dtype=getattr(torch, args.dtype),
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
        results[name] = scores
        (out / "grids").mkdir(parents=True, exist_ok=True)
        firsts = [(images[i], prompts[i]) for i in range(0, len(images), args.n_images)]
        sample.labelled_grid(firsts, cols=min(8, len(firsts))).save(out / "grids" / f"{name}.png")
        print(f"[rank {rank}] {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    if world_size > 1:
        import torch.distributed as dist
        shards = [None] * world_size
        dist.all_gather_object(shards, results)
        results = {k: v for shard in shards for k, v in shard.items()}
        dist.destroy_process_group()
    if rank != 0:
        return None
    results = {s: results[s] for s in subjects}                 # subject order, whatever the sharding
    summary = summarize(results)
    settings = {k: getattr(args, k) for k in ("ckpt", "scales", "dataset", "n_images", "n_prompts", "seed",
                                              "num_inference_steps", "guidance_scale", "token", "dtype",
                                              "batch_images")}
    (out / "results.json").write_text(json.dumps({"subjects": results, "summary": summary, "settings": settings},
                                                 indent=2))
    (out / "results.md").write_text(markdown(results, summary) + "\n")
    print(markdown(results, summary))
    return results, summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Score generated images (--images), or run the DreamBooth protocol "
                                     "over a dataset's subjects (--dataset; torchrun shards the subjects).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", default=None, help="folder of generated images to score")
    parser.add_argument("--references", default=None, help="with --images: the subject's reference photos")
    parser.add_argument("--prompt", default=None, help="with --images: the prompt the images were generated from")
    parser.add_argument("--dataset", default=None, help="DreamBooth-layout folder: run the protocol on its subjects")
    parser.add_argument("--subjects", default="all", help="with --dataset: comma-separated subject names, or all")
    parser.add_argument("--ckpt", default=None, help="with --dataset: the base model, as in sample.py; "
                        "unset: the toy model")
    parser.add_argument("--scales", default=None, help="train.py output per subject, with {subject} in the path, "
                        "e.g. runs/peqa/{subject}/personalized.safetensors; unset: score the base model itself")
    parser.add_argument("--token", default="sks", help="the rare identifier the subjects were trained with")
    parser.add_argument("--n_images", type=int, default=4, help="images per prompt (the DreamBooth protocol uses 4)")
    parser.add_argument("--n_prompts", type=int, default=25, help="use the first N of the 25 prompt templates")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM denoising steps per image")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance when sampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt's images; prompt i uses seed + i")
    parser.add_argument("--device", default="cpu", help="with --dataset: cpu or cuda, for the model")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="with --dataset: "
                        "the model's weights and activations; unset: float16 on cuda, float32 on cpu")
    parser.add_argument("--batch_images", type=int, default=None, help="with --dataset: images denoised together "
                        "(whole templates); unset: one template's --n_images")
    parser.add_argument("--out", default="runs/eval", help="folder for results.json, results.md and grids/")
    parser.add_argument("--clip", default=None, help="local CLIP ViT-B/32 folder; unset: the toy evaluator")
    parser.add_argument("--dino", default=None, help="local DINO ViT-S/16 folder; unset: the toy evaluator")
    parser.add_argument("--crop_iou", action="store_true", help="measure the local CLIP-I crop against the toy "
                        "subjects' ground-truth boxes and exit")
    args = parser.parse_args()
    sample.pick_threads(args.device)
    if args.crop_iou:
        found, central, n = crop_iou(ckpt.load_sd(ckpt.TOY_CKPT), Path(__file__).parent / "assets/toy/dreambooth")
        print(f"attention box IoU {found:.3f} vs {central:.3f} for the central half-size box, {n} toy references")
        raise SystemExit(0)
    if args.dataset:
        if args.scales and "{subject}" not in args.scales:
            parser.error("--scales needs {subject} in the path: one train.py output per subject")
        if args.n_images < 1 or not 1 <= args.n_prompts <= 25 or (args.batch_images or 1) < 1:
            parser.error("--n_images and --batch_images must be >= 1 and --n_prompts in 1..25")
        args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
        if not math.isfinite(args.guidance_scale):
            parser.error(f"--guidance_scale must be a finite number, e.g. 7.5, got {args.guidance_scale}")
        try:
            run(args)
        except (ckpt.CheckpointError, train.TrainingError) as e:
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(0)
    if not (args.images and args.references and args.prompt):
        parser.error("give --dataset (the protocol), or --images, --references and --prompt (one folder)")
    ev = load_evaluators(args.clip, args.dino)
    try:
        gen, refs = read_images(args.images, "--images"), read_images(args.references)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"CLIP-I {clip_i(ev, gen, refs):.3f}  CLIP-T {clip_t(ev, gen, [args.prompt] * len(gen)):.3f}  "
          f"DINO {dino(ev, gen, refs):.3f}  ({len(gen)} images, {len(refs)} references)")
