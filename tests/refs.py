"""Tiny reference models (diffusers / transformers) with random weights, shared by the parity tests."""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import unet as unet_lib
import vae as vae_lib

UNET = unet_lib.tiny()
VAE = vae_lib.VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)  # 8x downsampling, like SD
TEXT = dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def randomize_(module, seed=0, std=0.05):
    """Overwrite every parameter (biases and norm affines too) so no tensor is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # keep norm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * std + scale)
    return module.eval()


def diffusers_unet(cfg=UNET, seed=0):
    return randomize_(UNet2DConditionModel(**unet_lib.diffusers_config(cfg)), seed, std=0.1)


def diffusers_vae(cfg=VAE, seed=1):
    return randomize_(AutoencoderKL(**vae_lib.diffusers_config(cfg)), seed, std=0.1)


def clip_text(seed=2, **overrides):
    return randomize_(CLIPTextModel(CLIPTextConfig(**{**TEXT, **overrides})), seed, std=0.05)
