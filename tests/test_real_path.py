"""bench/real_path.py's model builders: the files they write open in diffusers and transformers (tiny shapes here;
the bench writes SD v1.5, CLIP ViT-B/32 and DINO ViT-S/16 shapes with the same code)."""
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as ldm
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPModel, ViTImageProcessor, ViTModel

import ckpt
import eval as metrics
import unet as unet_lib
import vae as vae_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_path  # noqa: E402


def test_compvis_file_opens_in_diffusers_and_in_our_loader(tmp_path):
    """diffusers' own CompVis converters map every UNet, VAE and text-encoder tensor of the written file onto its
    models, which give our loader's outputs."""
    path = real_path.write_sd(tmp_path / "sd.safetensors", "tiny")
    tensors = {k: v.float() for k, v in load_file(path).items()}
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    ours = ckpt.load_sd(path)
    ucfg = unet_lib.diffusers_config(ours.unet.config)
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(ldm.convert_ldm_unet_checkpoint(tensors, ucfg), strict=True)
    vcfg = vae_lib.diffusers_config(ours.vae.config)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(ldm.convert_ldm_vae_checkpoint(tensors, vcfg), strict=True)
    text = ldm.convert_ldm_clip_checkpoint(tensors)
    assert set(text) >= set(ckpt.canonical_text_keys(ours.text_encoder.state_dict()))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ctx = torch.randn(1, 77, ucfg["cross_attention_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, ours.unet(x, t, ctx), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(x).sample, ours.vae.decode(x), rtol=1e-4, atol=1e-4)


def test_evaluator_folders_open_in_transformers(tmp_path):
    clip, dino = real_path.write_clip(tmp_path / "clip", "tiny"), real_path.write_dino(tmp_path / "dino", "tiny")
    assert isinstance(CLIPModel.from_pretrained(clip, local_files_only=True), CLIPModel)
    assert isinstance(ViTModel.from_pretrained(dino, local_files_only=True, add_pooling_layer=False), ViTModel)
    assert CLIPImageProcessor.from_pretrained(clip).crop_size["height"] == 32
    assert ViTImageProcessor.from_pretrained(dino).size["height"] == 32
    ev = metrics.load_evaluators(str(clip), str(dino))     # what eval.py --clip --dino reads from them
    assert ev.clip_pre[0] == ev.dino_pre[0] == 32
    full = real_path.SIZES["full"]                           # and the bench's shapes are the published ones
    assert (full["clip_vision"]["patch_size"], full["clip_vision"]["hidden_size"], full["projection_dim"]) == (32, 768,
                                                                                                               512)
    assert (full["dino"]["patch_size"], full["dino"]["hidden_size"], full["dino"]["num_attention_heads"]) == (16, 384,
                                                                                                              6)


@pytest.mark.slow
def test_whole_path_runs_on_tiny_shapes(tmp_path):
    """Every stage of bench/real_path.py, as at full size, on tiny shapes (about 90 s; `pytest -m slow`)."""
    if not real_path.PHOTOS.is_dir():
        pytest.skip(f"no photos at {real_path.PHOTOS}")
    real_path.main(["--size", "tiny", "--work", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert all(stage in table for stage, _, _ in real_path.commands(tmp_path, "tiny"))
    assert (tmp_path / "qdp" / "report.md").is_file() and (tmp_path / "export_diffusers" / "model_index.json").is_file()
