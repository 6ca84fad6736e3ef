"""Evaluation of subject-driven generation: CLIP-I, CLIP-T and DINO, as DreamBooth defines them, and zero-shot
attribute accuracy.

DreamBooth (arXiv 2208.12242, sec. 4.1) scores a personalized model on two axes:
- subject fidelity: CLIP-I, the mean cosine similarity between CLIP (arXiv 2103.00020) image embeddings of every
  generated image and every reference photo; DINO, the same with the CLS embedding of a self-supervised ViT
  (DINO ViT-S/16, arXiv 2104.14294), which separates instances of one class better than CLIP does;
- prompt fidelity: CLIP-T, the mean cosine similarity between each generated image and its own prompt.
The evaluators are CLIP ViT-B/32 and DINO ViT-S/16 from folders the user supplies (nothing is downloaded), or, by
default, the toy world's own CLIP and SimCLR-trained ViT (toy.py), which stand in for them on a CPU.

    python eval.py --images out/samples --references assets/toy/dreambooth/mug_star --prompt "a photo of sks mug"
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

import ckpt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Evaluators:
    """The two image encoders and how each wants its pixels (side, per-channel mean and std)."""
    clip: CLIPModel
    dino: ViTModel
    tokenizer: CLIPTokenizer
    clip_pre: tuple = (224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    dino_pre: tuple = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def load_evaluators(clip=None, dino=None):
    """Real evaluators from local folders (a transformers CLIPModel and ViTModel, with their preprocessor
    configs), or the toy world's when none is given."""
    if clip is None and dino is None:
        import toy
        toy_clip, toy_dino = toy.load_evaluators()
        half = (toy.SIZE, (0.5,) * 3, (0.5,) * 3)  # the toy encoders see pixels in [-1, 1]
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


def read_images(folder):
    """Every image in a folder, sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [Image.open(p).convert("RGB") for p in files]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Score generated images against reference photos and a prompt.")
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--references", required=True, help="folder of the subject's reference photos")
    parser.add_argument("--prompt", required=True, help="the prompt the images were generated from")
    parser.add_argument("--clip", default=None, help="local CLIP ViT-B/32 folder (default: the toy evaluator)")
    parser.add_argument("--dino", default=None, help="local DINO ViT-S/16 folder (default: the toy evaluator)")
    args = parser.parse_args()
    ev = load_evaluators(args.clip, args.dino)
    gen, refs = read_images(args.images), read_images(args.references)
    print(f"CLIP-I {clip_i(ev, gen, refs):.3f}  CLIP-T {clip_t(ev, gen, [args.prompt] * len(gen)):.3f}  "
          f"DINO {dino(ev, gen, refs):.3f}  ({len(gen)} images, {len(refs)} references)")
