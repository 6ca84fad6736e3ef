"""Reading and writing SD v1 checkpoints: CompVis single files and diffusers folders, with readable errors.

This file exists so that unet.py and vae.py stay pure architecture: everything about files (formats, key layouts,
what a broken or foreign checkpoint looks like) lives here, and quant.py, train.py and sample.py all load through
`load_sd`. The model is latent diffusion (arXiv 2112.10752); the text encoder is CLIP's text tower (arXiv 2103.00020),
used as `transformers.CLIPTextModel` with the tokenizer files shipped in assets/tokenizer (nothing is downloaded).

Layouts:
- CompVis single file (`.safetensors`, or `.ckpt` read with `torch.load(weights_only=True)`): `model.diffusion_model.*`
  (UNet, our module names), `first_stage_model.*` (VAE, our names), `cond_stage_model.transformer.*` (CLIPTextModel).
  Everything else (noise-schedule buffers, `model_ema.*`, bookkeeping) is knowingly ignored.
- diffusers folder: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, each with its config.json; unet.py and vae.py hold
  the name maps.

    python ckpt.py PATH                       # load a checkpoint, print what it holds
    python ckpt.py PATH --to_diffusers DIR    # convert a CompVis file to a diffusers folder (or --to_compvis FILE)
"""
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path
import warnings

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import qlayers
import unet as unet_lib
import vae as vae_lib

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
# the embedded default, made by toyworld/toy.py
TOY_CKPT = Path(__file__).resolve().parent / "assets" / "toy" / "toy_sd.safetensors"
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
HINT = "qdp needs a Stable Diffusion v1.x checkpoint (a CompVis .safetensors/.ckpt file or a diffusers folder)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line message that says what to do."""


@dataclass
class StableDiffusion:
    unet: unet_lib.UNet
    vae: vae_lib.AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer

    def to(self, device=None, dtype=None):
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(self.unet.parameters()).device


# --------------------------------------------------------------------------------------------------------------------
# text side


def load_tokenizer(folder=None):
    """The SD v1 CLIP tokenizer, from a diffusers `tokenizer/` folder or the copy shipped in assets/tokenizer."""
    return CLIPTokenizer.from_pretrained(str(folder or TOKENIZER_DIR), local_files_only=True)


def tokenize(tokenizer, prompts):
    """prompts (str or list) -> ids (B,77): start token, BPE tokens, end token, padded with the end token.
    Like SD, a prompt longer than 75 tokens is cut, with a warning that shows what was dropped."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    for p in prompts:
        full = tokenizer(p, verbose=False).input_ids
        if len(full) > n:
            cut = tokenizer.decode(full[n - 1:-1])
            warnings.warn(f"prompt cut to {n - 2} tokens, SD v1's limit; dropped: {cut!r}", stacklevel=2)
    return ids


def canonical_text_keys(sd):
    """Text-encoder keys as real files store them (`text_model.embeddings...`): files written by transformers < 4.20
    and the state dicts of transformers >= 5 lack the `text_model.` level."""
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)  # a fixed arange, a buffer that older files stored
    return sd


def model_text_keys(sd, text_encoder):
    """Canonical keys -> the keys of the installed transformers' CLIPTextModel."""
    nested = next(iter(text_encoder.state_dict())).startswith("text_model.")
    return sd if nested else {k[len("text_model."):]: v for k, v in sd.items()}


def text_config(sd, meta=None):
    """CLIPTextConfig from the shapes of a CLIPTextModel state dict; heads = width/64 as in every CLIP text tower,
    unless the file's qdp metadata says otherwise."""
    emb = sd["text_model.embeddings.token_embedding.weight"]
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    cfg = dict(vocab_size=emb.shape[0], hidden_size=emb.shape[1], num_hidden_layers=layers,
               intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
               max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
               num_attention_heads=max(1, emb.shape[1] // 64), hidden_act="quick_gelu", projection_dim=emb.shape[1],
               bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPTextConfig(**{**cfg, **(meta or {})})


# --------------------------------------------------------------------------------------------------------------------
# reading tensors from files


def read_tensors(path):
    """(tensors, metadata) from a .safetensors file or a .ckpt/.pt/.bin pickle loaded with weights_only=True.
    The format is told by the file's first bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {HINT}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:9] == b"{":                                    # safetensors: u64 header length, then a JSON header
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch zip archive, or a legacy pickle
        raise CheckpointError(f"{path} is neither a safetensors file nor a PyTorch checkpoint "
                              f"(it starts with {head[:12]!r}); {HINT}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?)") from None
        raise CheckpointError(f"{path} needs arbitrary Python code to load and qdp will not run it "
                              f"(torch.load weights_only=True refused it); convert it to .safetensors with a tool "
                              f"you trust") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None
    meta = {}
    if isinstance(obj, dict):                                # qdp's config, as save_compvis writes it to a .ckpt
        meta = {k: v for k, v in obj.items() if k.startswith("qdp.") and isinstance(v, str)}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; {HINT}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, meta


def check_family(tensors, path):
    """Refuse SD 2.x, SDXL and diffusers component files early, with a message that names what the file is."""
    keys = list(tensors)
    if any(k.startswith("conditioner.embedders.") or "label_emb" in k for k in keys):
        raise CheckpointError(f"{path} looks like an SDXL checkpoint; {HINT}")
    to_k = [v for k, v in tensors.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in tensors.items() if k.endswith("proj_in.weight")]
    if (any(k.startswith("cond_stage_model.model.") for k in keys) or any(v.shape[1] == 1024 for v in to_k)
            or any(v.ndim == 2 for v in proj_in)):
        raise CheckpointError(f"{path} looks like an SD 2.x checkpoint (OpenCLIP text encoder, 1024-wide context); "
                              f"{HINT}")
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
        raise CheckpointError(f"{path} is one component of a diffusers folder; pass the folder that holds unet/, "
                              f"vae/, text_encoder/ and tokenizer/")
    if not any(k.startswith(PREFIX["unet"]) for k in keys):
        raise CheckpointError(f"{path} has no SD v1 UNet: none of its {len(keys)} tensors starts with "
                              f"'{PREFIX['unet']}' (it has e.g. {keys[:3]}); {HINT}")


def split_compvis(tensors):
    """{part: state dict} for the UNet, VAE and text encoder of a CompVis file; other tensors are ignored."""
    parts = {name: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for name, p in PREFIX.items()}
    parts["text_encoder"] = canonical_text_keys(parts["text_encoder"])
    return parts


def fill(model, sd, name, path):
    """Load `sd` into `model` (built on the meta device) strictly, reshaping only 1x1 conv <-> linear weights;
    a mismatch is one line that names what is missing, unexpected or the wrong shape."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [k for k in want if k in sd and sd[k].numel() != want[k].numel()]
    if missing or unexpected or wrong:
        say = lambda what, ks: f"{len(ks)} {what} (e.g. {ks[0]})" if ks else f"0 {what}"
        raise CheckpointError(f"{path}: the {name} does not match SD v1's layout: {say('missing', missing)}, "
                              f"{say('unexpected', unexpected)}, {say('of the wrong shape', wrong)}; the file is "
                              f"incomplete or not an SD v1 checkpoint")
    check_values(want, sd, name, path)
    model.load_state_dict({k: sd[k].reshape(want[k].shape) for k in want}, strict=True, assign=True)
    return model


def check_values(want, got, name, path):
    """Where the model holds float weights the file must hold finite floats: an integer or bool tensor would load as
    garbage, and one NaN or inf turns every sample black, with no error otherwise."""
    for k, w in want.items():
        v = got.get(k)
        if v is None or not w.is_floating_point():
            continue
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: the {name}'s {k} holds {str(v.dtype).removeprefix('torch.')} values "
                                  f"where float weights belong; the file is damaged or not an SD v1 checkpoint")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: the {name}'s {k} holds NaN or inf; the file is damaged or comes from a "
                                  f"training run that diverged: use an earlier copy")


def build(parts, path, meta=None, tokenizer=None, device="cpu", dtype=torch.float32, unet=None):
    """StableDiffusion from CompVis-named state dicts; the config comes from the shapes, and from the file's qdp
    metadata for what shapes cannot tell (head counts, GroupNorm groups, the latent scale). `unet`: one already
    loaded (build_quantized's), so only the VAE and text encoder come from `parts`."""
    meta = json.loads(meta["qdp.config"]) if meta and "qdp.config" in meta else {}
    cast = lambda sd: {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    for name in PREFIX:
        if not parts[name]:
            raise CheckpointError(f"{path} has no {name} (no tensors under '{PREFIX[name]}'); {HINT}")
    try:
        if unet is None:
            ucfg = meta_cfg(unet_lib.UNetConfig.from_state_dict(parts["unet"]), meta.get("unet"))
        vcfg = meta_cfg(vae_lib.VAEConfig.from_state_dict(parts["vae"]), meta.get("vae"))
        tcfg = text_config(parts["text_encoder"], meta.get("text_encoder"))
    except (KeyError, StopIteration, IndexError) as e:
        raise CheckpointError(f"{path} is missing tensors that define the architecture ({e}); the file is "
                              f"incomplete or not an SD v1 checkpoint") from None
    with torch.device("meta"):
        plain = unet_lib.UNet(ucfg) if unet is None else None
        vae = vae_lib.AutoencoderKL(vcfg)
    text_encoder = CLIPTextModel(tcfg)
    if unet is None:
        unet = fill(plain, cast(parts["unet"]), "UNet", path)
    fill(vae, cast(parts["vae"]), "VAE", path)
    fill(text_encoder, model_text_keys(cast(parts["text_encoder"]), text_encoder), "text encoder", path)
    text_encoder.to(device=device, dtype=dtype)
    return StableDiffusion(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer or load_tokenizer())


def meta_cfg(cfg, saved):
    """Overwrite the fields that shapes cannot tell with the ones a qdp writer stored."""
    if not saved:
        return cfg
    names = {f.name for f in fields(cfg)}
    return type(cfg)(**{**asdict(cfg), **{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in saved.items() if k in names}})


# --------------------------------------------------------------------------------------------------------------------
# diffusers folders


def unet_config_from_diffusers(d, path):
    if d.get("addition_embed_type") or d.get("cross_attention_dim") == 2048:
        raise CheckpointError(f"{path} looks like an SDXL UNet; {HINT}")
    if d.get("use_linear_projection") or d.get("cross_attention_dim") == 1024 or isinstance(d.get("attention_head_dim"), list):
        raise CheckpointError(f"{path} looks like an SD 2.x UNet; {HINT}")
    bo = d["block_out_channels"]
    return unet_lib.UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], model_channels=bo[0],
        channel_mult=tuple(b // bo[0] for b in bo), num_res_blocks=d["layers_per_block"],
        attention_levels=tuple(i for i, t in enumerate(d["down_block_types"]) if t.startswith("CrossAttn")),
        num_heads=d.get("num_attention_heads") or d.get("attention_head_dim", 8),
        transformer_depth=d.get("transformer_layers_per_block", 1), context_dim=d["cross_attention_dim"],
        norm_groups=d.get("norm_num_groups", 32), sample_size=d.get("sample_size", 64))


def vae_config_from_diffusers(d):
    bo = d["block_out_channels"]
    return vae_lib.VAEConfig(in_channels=d.get("in_channels", 3), ch=bo[0], ch_mult=tuple(b // bo[0] for b in bo),
                             num_res_blocks=d["layers_per_block"], z_channels=d["latent_channels"],
                             norm_groups=d.get("norm_num_groups", 32), scale_factor=d.get("scaling_factor", 0.18215))


def read_component(folder, sub, stems):
    """(tensors, config dict) of one diffusers component, preferring safetensors and fp32 files."""
    cfg_file = folder / sub / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} is not a complete diffusers folder: {sub}/config.json is missing")
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            if (folder / sub / (stem + suffix)).is_file():
                return read_tensors(folder / sub / (stem + suffix))[0], json.loads(cfg_file.read_text())
    raise CheckpointError(f"{folder}/{sub} has no weights file ({stems[0]}.safetensors or .bin)")


def read_diffusers(folder):
    """CompVis-named state dicts (and the configs) from a diffusers folder."""
    usd, ud = read_component(folder, "unet", ["diffusion_pytorch_model"])
    vsd, vd = read_component(folder, "vae", ["diffusion_pytorch_model"])
    tsd, td = read_component(folder, "text_encoder", ["model", "pytorch_model"])
    ucfg, vcfg = unet_config_from_diffusers(ud, folder / "unet"), vae_config_from_diffusers(vd)
    def back(key_map, sd):  # diffusers names -> ours; unknown keys are kept so `fill` can name them
        ours = {v: k for k, v in key_map.items()}
        return {ours.get(k, k): t for k, t in sd.items()}

    parts = {"unet": back(unet_lib.diffusers_key_map(ucfg), usd), "vae": back(vae_lib.diffusers_key_map(vcfg), vsd),
             "text_encoder": canonical_text_keys(tsd)}
    tkeys = {"num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim"}
    meta = {"unet": asdict(ucfg), "vae": asdict(vcfg), "text_encoder": {k: v for k, v in td.items() if k in tkeys}}
    return parts, {"qdp.config": json.dumps(meta)}


# --------------------------------------------------------------------------------------------------------------------
# what users hand us besides checkpoints: where to write, and photos


def check_output(path, flag, overwrite=False, inputs=(), folder=False):
    """Before any work: writing `path` (a file, or with folder=True a folder) loses nothing the user made. Refused:
    one of this run's `inputs` (even with overwrite), an existing file or non-empty folder unless `overwrite`, a
    file where a folder belongs or the other way round, and a place that cannot be created or written."""
    path = Path(path)
    if any(path.resolve() == Path(p).resolve() for p in inputs if p):
        raise CheckpointError(f"{flag} {path} is also an input of this run; write somewhere else")
    if folder and path.is_file():
        raise CheckpointError(f"{flag} {path} is a file, not a folder; give a folder path")
    if not folder and path.is_dir():
        raise CheckpointError(f"{flag} {path} is a folder; give a file path, e.g. {path / 'model.safetensors'}")
    if path.exists() and not overwrite and (not folder or any(path.iterdir())):
        raise CheckpointError(f"{flag} {path} already exists; add --overwrite to replace it, or choose another path")
    parent = path.resolve()                  # where the writing happens: the folder itself, or the nearest that exists
    if not (folder and parent.is_dir()):
        parent = next(p for p in parent.parents if p.exists())
    if not parent.is_dir():
        raise CheckpointError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{flag} {path}: {parent} is not writable; choose another path")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def image_files(folder, flag="--instance_data_dir"):
    """The photos in a folder, sorted by name (dotfiles, such as macOS's ._ files, left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{flag} {folder} is not a folder; point it at a folder of photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def open_image(path):
    """Any image file -> an upright 8-bit RGB PIL image, or None with a one-line warning if it cannot be read
    (damaged, not an image, or a decompression bomb: more pixels than PIL's safety limit)."""
    try:
        img = Image.open(path)
        img.load()
        img = ImageOps.exif_transpose(img)           # phone photos store their rotation in EXIF
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"skipping {path}: not a readable image ({why})", stacklevel=2)
        return None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit or float grayscale: rescale, don't clip
        a = np.asarray(img, dtype=np.float32)
        a = a / 65535.0 if a.max() > 255 else a / 255.0
        img = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")                  # transparent pixels become white, not black
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")                      # CMYK, palette, grayscale


def read_images(folder, flag="--instance_data_dir"):
    """Every readable photo of a folder, as open_image reads it; a folder with none is a CheckpointError."""
    files = image_files(folder, flag)
    images = [im for im in map(open_image, files) if im is not None]
    if not images:
        raise CheckpointError(f"{flag} {folder} holds no readable image ({', '.join(IMAGE_SUFFIXES)}); add photos")
    return images


# --------------------------------------------------------------------------------------------------------------------
# the entry points


def load_sd(path, device="cpu", dtype=torch.float32, verbose=False):
    """Load an SD v1 model from a CompVis single file or a diffusers folder."""
    path = Path(path)
    if path == TOY_CKPT and not path.is_file():
        raise CheckpointError(f"the embedded toy model is missing ({path}); run `python -m toyworld.toy` to "
                              "pretrain it")
    if path.is_dir():
        parts, meta = read_diffusers(path)
        tok_dir = path / "tokenizer"
        tokenizer = load_tokenizer(tok_dir) if (tok_dir / "vocab.json").is_file() else None
    else:
        tensors, meta = read_tensors(path)
        if "qdp.quant" in meta:  # written by quant.py: an integer UNet (qlayers.py)
            return build_quantized(tensors, meta, path, device, dtype)
        check_family(tensors, path)
        parts, tokenizer = split_compvis(tensors), None
    model = build(parts, path, meta, tokenizer, device, dtype)
    if verbose:
        n = {k: len(v) for k, v in parts.items()}
        print(f"loaded {path}: UNet {n['unet']}, VAE {n['vae']}, text encoder {n['text_encoder']} tensors")
    return model


def config_json(model):
    """What shapes cannot tell, stored in every file qdp writes (safetensors metadata is str -> str)."""
    t = model.text_encoder.config
    return json.dumps({"unet": asdict(model.unet.config), "vae": asdict(model.vae.config),
                       "text_encoder": {"num_attention_heads": t.num_attention_heads, "hidden_act": t.hidden_act,
                                        "layer_norm_eps": t.layer_norm_eps, "projection_dim": t.projection_dim}})


def atomic_save(tensors, path, metadata=None):
    """save_file to a temporary name, then rename: a crash never leaves a half-written file behind. A `.ckpt` path
    gets what older tools open with torch.load: {"state_dict": tensors, **metadata}, tensors and strings only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, **(metadata or {})}, tmp)
    else:
        save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)                            # safetensors creates its files 0600: a file as any other
    os.replace(tmp, path)


@torch.no_grad()
def plain_unet(unet):
    """A plain UNet (unet.py's Conv2d and Linear) holding a quantized UNet's dequantized weights, scale * (w_int -
    zero_point), the parts of a split layer concatenated back along the input dimension, and its other tensors as
    they are. It computes what `unet` computes with activation quantization off, and saves as any SD v1 UNet does.
    A UNet without quantized layers is returned as it is."""
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, qlayers.QuantLayer)}
    if not layers:
        return unet
    with torch.device("meta"):
        plain = unet_lib.UNet(unet.config)
    own, want = unet.state_dict(), {}
    for k in plain.state_dict():
        name, _, leaf = k.rpartition(".")
        if name in layers and leaf == "weight":
            want[k] = torch.cat([q.weight() for q in layers[name].weight_quantizers()], dim=1)
        else:
            want[k] = own[k]
    return fill(plain, want, "UNet", "the dequantized UNet").eval()


def compvis_tensors(model, dtype=None):
    """The model's tensors under CompVis names (a quantized UNet's codes and scales as they are); floating tensors
    cast to `dtype` if given."""
    parts = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict(),
             "text_encoder": canonical_text_keys(model.text_encoder.state_dict())}
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return {PREFIX[name] + k: cast(v) for name, sd in parts.items() for k, v in sd.items()}


def save_compvis(model, path, dtype=None, metadata=None):
    """One .safetensors (or .ckpt) file in the CompVis layout, with qdp's config and any extra `metadata` (strings)
    in its metadata; floating tensors are cast to `dtype` if given (e.g. torch.float16 to halve the file)."""
    atomic_save(compvis_tensors(model, dtype), path, {"format": "pt", "qdp.config": config_json(model),
                                                      **(metadata or {})})


def save_diffusers(model, folder, dtype=None):
    """A diffusers folder that `StableDiffusionPipeline.from_pretrained(folder)` opens (no safety checker); floating
    tensors are cast to `dtype` if given."""
    folder = Path(folder)
    ucfg, vcfg = model.unet.config, model.vae.config
    umap, vmap = unet_lib.diffusers_key_map(ucfg), vae_lib.diffusers_key_map(vcfg)
    cast = lambda sd: {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}
    vae_sd = {vmap[k]: (v.flatten(1) if ".attentions." in vmap[k] and v.ndim == 4 else v)  # 1x1 conv -> linear
              for k, v in model.vae.state_dict().items()}
    atomic_save(cast({umap[k]: v for k, v in model.unet.state_dict().items()}),
                folder / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    atomic_save(cast(vae_sd), folder / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    atomic_save(cast(canonical_text_keys(model.text_encoder.state_dict())),
                folder / "text_encoder" / "model.safetensors", {"format": "pt"})
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **unet_lib.diffusers_config(ucfg)},
               "vae": {"_class_name": "AutoencoderKL", **vae_lib.diffusers_config(vcfg)},
               "text_encoder": {**model.text_encoder.config.to_dict(), "architectures": ["CLIPTextModel"]},
               "scheduler": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                             "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}}
    for sub, cfg in configs.items():
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(json.dumps(cfg, indent=2, default=list))
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------------------------------
# quantized files (quant.py writes them) and train.py's personalized scales


def save_quantized(sd_q, path, meta=None):
    """One safetensors file: the quantized UNet's state dict (with in_scale only where present), the VAE and text
    encoder as save_compvis writes them, the model config ("qdp.config") and the quantization settings with
    `meta` ("qdp.quant")."""
    wbits, abits, softmax_bits = qlayers.bits_of(sd_q.unet)
    info = json.dumps({"wbits": wbits, "abits": abits, "softmax_bits": softmax_bits, "packing": qlayers.PACKING,
                       **(meta or {})})
    atomic_save(compvis_tensors(sd_q), path, {"format": "pt", "qdp.config": config_json(sd_q), "qdp.quant": info,
                                              "qdp.unet_sha256": unet_digest(sd_q.unet.state_dict())})


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
        raise CheckpointError(f"{path}: the quantized UNet does not match its config: {say('missing', missing)}, "
                                   f"{say('unexpected', unexpected)}, {say('of the wrong shape or dtype', wrong)}; "
                                   f"the file is incomplete, write it again with quant.py")
    for k, v in got.items():
        n = bits[0] if ".weight_quantizer" in k else bits[2] if "softmax_quantizer" in k else bits[1]
        if k.endswith(".w_int") and n not in (4, 8) and int(qlayers.unpack(v, n, 2 * v.shape[1]).max()) > 2**n - 1:
            raise CheckpointError(f"{path}: {k} holds codes above {2**n - 1}, out of range for {n} bits")
        if k.endswith(".zero_point") and not (bool((v == v.round()).all()) and 0 <= v.min() and v.max() <= 2**n - 1):
            raise CheckpointError(f"{path}: {k} must hold integers in [0, {2**n - 1}] for {n} bits")
        if k.endswith("scale") and not bool((torch.isfinite(v) & ((v > 0) | k.endswith(".in_scale"))).all()):
            raise CheckpointError(f"{path}: {k} holds scales that are not finite and positive")


def build_quantized(tensors, meta, path, device="cpu", dtype=torch.float32):
    """A StableDiffusion from the tensors and metadata of a file that save_quantized wrote (load_sd calls it)."""
    try:
        info, configs = json.loads(meta["qdp.quant"]), json.loads(meta["qdp.config"])
        bits = (int(info["wbits"]), int(info["abits"]), int(info["softmax_bits"]))
        ucfg = meta_cfg(unet_lib.UNetConfig(), configs["unet"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable quantization metadata ({e}); write it again with "
                                   f"quant.py") from None
    if info.get("packing") != qlayers.PACKING:
        raise CheckpointError(f"{path} comes from an older quant.py (codes packed as {info.get('packing')!r}, "
                                   f"not {qlayers.PACKING!r}); quantize the model again")
    parts = split_compvis(tensors)
    if not parts["vae"] or not parts["text_encoder"]:
        raise CheckpointError(f"{path} lacks the VAE or the text encoder; write it again with quant.py")
    if "qdp.unet_sha256" in meta and unet_digest(parts["unet"]) != meta["qdp.unet_sha256"]:
        raise CheckpointError(f"{path}: the quantized UNet's tensors do not match the checksum stored with them "
                                   f"(the file was damaged or edited); quantize the model again or use a good copy")
    in_scales = any(k.endswith(".in_scale") for k in parts["unet"])
    qunet = qlayers.quant_skeleton(ucfg, *bits, device="meta", in_scales=in_scales)
    check_quantized(qunet.state_dict(), parts["unet"], bits, path)
    check_values(qunet.state_dict(), parts["unet"], "quantized UNet", path)
    cast = lambda sd: {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    qunet.load_state_dict(cast(parts["unet"]), strict=True, assign=True)
    return build(parts, path, meta, device=device, dtype=dtype, unet=qunet)


def load_quantized(path, device="cpu", dtype=torch.float32):
    tensors, meta = read_tensors(path)
    if "qdp.quant" not in meta:
        raise CheckpointError(f"{path} is not a quantized qdp file (no 'qdp.quant' metadata); make one with "
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


def quantized_from(path):
    """The sha256 of the float checkpoint a quantized file was made from (its "qdp.quant" metadata), or None: no
    such file, or not a quantized one."""
    if not Path(path).is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("qdp.quant", "{}")).get("base_sha256")


def model_sha256(path):
    """What a checkpoint holds rather than its bytes: for a quantized file, the sha256 of its UNet's tensors (stored
    at save, checked at load) and of the float checkpoint it came from; else sha256(path). Two quantizations of one
    model with the same settings on one machine and thread count are bit-identical but record different timings."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "qdp.unet_sha256" in meta:
            base = json.loads(meta.get("qdp.quant", "{}")).get("base_sha256", "")
            return hashlib.sha256((meta["qdp.unet_sha256"] + base).encode()).hexdigest()
    return sha256(path)


def load_personalized(sd, path, base_path=None):
    """Put train.py's output into a loaded base model: scales (PEQA), experts (S2: sd.unet becomes an ExpertUNet)
    or full UNet weights. With `base_path`, checks that it is the model the run started from."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({e}); pass the personalized.safetensors train.py wrote")
    if "qdp.train" not in meta:
        raise CheckpointError(f"{path} is not a train.py output (no qdp.train metadata)")
    config = json.loads(meta["qdp.train"])
    # what the base holds; or, for runs recorded before model_sha256, its file's bytes
    if base_path is not None and config["base_sha256"] not in (model_sha256(base_path), sha256(base_path)):
        raise CheckpointError(f"{path} was trained on another base model ({config['ckpt']}); pass that "
                                   "file as --ckpt")
    unet = sd.unet
    if config["method"] == "full":
        unet.load_state_dict(tensors)                # copies into the model's own device and dtype
        return sd
    if config.get("multi_channel"):
        qlayers.add_in_scales(unet)
    if config["n_experts"] == 1:
        own = qlayers.scale_params(unet)
        with torch.no_grad():
            for n, v in tensors.items():
                own[n].copy_(v)
        return sd
    own, experts = qlayers.scale_params(unet), [{} for _ in range(config["n_experts"])]
    for n, v in tensors.items():
        k, name = n.split(".", 2)[1:]                # expert.{k}.{quantizer name}.{scale or in_scale}
        experts[int(k)][name] = nn.Parameter(v.to(own[name]), requires_grad=False)
    sd.unet = qlayers.ExpertUNet(unet, experts, config["bounds"])
    return sd


def main(argv=None):
    """`python ckpt.py PATH`: describe a checkpoint, and convert it with --to_diffusers / --to_compvis."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Load an SD v1 checkpoint, describe it, optionally convert it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", help="CompVis .safetensors/.ckpt file or diffusers folder")
    parser.add_argument("--to_diffusers", default=None, help="if given, also write the model as a diffusers folder")
    parser.add_argument("--to_compvis", default=None,
                        help="if given, also write the model as one CompVis .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="let --to_diffusers / --to_compvis replace what "
                        "is there")
    args = parser.parse_args(argv)
    try:                                     # the outputs are checked before the (slow) load
        outs = [("--to_diffusers", args.to_diffusers, True), ("--to_compvis", args.to_compvis, False)]
        for flag, out, folder in outs:
            if out:
                check_output(out, flag, args.overwrite, [args.path], folder=folder)
        if args.to_diffusers and args.to_compvis and Path(args.to_compvis).resolve().is_relative_to(
                Path(args.to_diffusers).resolve()):
            raise CheckpointError("--to_compvis lies inside the --to_diffusers folder; write it elsewhere")
        sd = load_sd(args.path, verbose=True)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    count = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
    print(f"UNet {count(sd.unet)} {sd.unet.config}\nVAE {count(sd.vae)} {sd.vae.config}\n"
          f"text encoder {count(sd.text_encoder)} width {sd.text_encoder.config.hidden_size}")
    if args.to_diffusers:
        save_diffusers(sd, args.to_diffusers)
        print(f"wrote {args.to_diffusers}")
    if args.to_compvis:
        save_compvis(sd, args.to_compvis)
        print(f"wrote {args.to_compvis}")


if __name__ == "__main__":
    import ckpt as module  # the importable module, not this __main__ copy: quant.py raises ckpt.CheckpointError, and
    module.main()  # `except CheckpointError` here would not catch another copy's class
