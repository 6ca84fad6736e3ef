"""Checkpoint files: parity through our writers and loaders, round trips, real-file quirks and hostile inputs."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt
from ckpt import CheckpointError, load_sd, save_compvis, save_diffusers
from conftest import SHARED
from refs import clip_text, diffusers_unet, diffusers_vae

TOKENIZER_REF = SHARED / "sd15_configs" / "tokenizer"


@pytest.fixture(scope="module")
def refs():
    return diffusers_unet(), diffusers_vae(), clip_text()


@pytest.fixture(scope="module")
def compvis_file(refs, tmp_path_factory):
    """A CompVis-layout .safetensors written by our writer from a diffusers folder of random tiny weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    unet, vae, text = refs
    root = tmp_path_factory.mktemp("ckpt")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=ckpt.load_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    save_compvis(load_sd(root / "diffusers"), root / "model.safetensors")
    return root / "model.safetensors"


def test_parity_through_compvis_file(refs, compvis_file):
    """UNet, VAE encode/decode and text encoder loaded from our CompVis file match the reference modules to 1e-4."""
    unet, vae, text = refs
    sd = load_sd(compvis_file)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.randn(2, 77, 32)
    img, z = torch.rand(2, 3, 32, 48) * 2 - 1, torch.randn(2, 4, 4, 6)
    ids = ckpt.tokenize(sd.tokenizer, ["a photo of sks dog", "a red striped mug on the beach"])
    with torch.no_grad():
        torch.testing.assert_close(sd.unet(x, t, ctx), unet(x, t, ctx).sample, atol=1e-4, rtol=0)
        mean, logvar = sd.vae.encode(img)
        dist = vae.encode(img).latent_dist
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(sd.vae.decode(z), vae.decode(z).sample, atol=1e-4, rtol=0)
        torch.testing.assert_close(sd.text_encoder(ids).last_hidden_state, text(ids).last_hidden_state,
                                   atol=1e-4, rtol=0)


def test_round_trip_is_bit_identical(compvis_file, tmp_path):
    """CompVis file -> ours -> diffusers folder -> ours -> CompVis file leaves every tensor bit-identical."""
    save_diffusers(load_sd(compvis_file), tmp_path / "d")
    save_compvis(load_sd(tmp_path / "d"), tmp_path / "again.safetensors")
    a, b = load_file(compvis_file), load_file(tmp_path / "again.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ckpt_file_round_trip(compvis_file, tmp_path):
    """save_compvis to a .ckpt writes what older tools open, torch.load(weights_only=True) -> {"state_dict": the
    CompVis tensors}, and it loads back with the same tensors and the config shapes cannot tell (2 heads, not 8)."""
    sd = load_sd(compvis_file)
    save_compvis(sd, tmp_path / "m.ckpt", dtype=torch.float16)
    obj = torch.load(tmp_path / "m.ckpt", weights_only=True)
    a = load_file(compvis_file)
    assert obj["state_dict"].keys() == a.keys() and "qdp.config" in obj
    assert all(torch.equal(obj["state_dict"][k], v.half()) for k, v in a.items())
    again = load_sd(tmp_path / "m.ckpt")
    assert again.unet.config == sd.unet.config and again.unet.config.num_heads == 2
    assert not (tmp_path / "m.ckpt.tmp").exists()


def test_diffusers_opens_our_folder(compvis_file, tmp_path):
    """diffusers' own pipeline loads the folder we write and its UNet computes what ours does."""
    from diffusers import StableDiffusionPipeline
    ours = load_sd(compvis_file)
    save_diffusers(ours, tmp_path / "d")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 500, ctx).sample, ours.unet(x, 500, ctx), atol=1e-5, rtol=0)


def test_real_compvis_quirks_load(compvis_file, tmp_path):
    """A .ckpt like the real ones (Lightning wrapper, schedule buffers, EMA copies, fp16, old text keys) loads."""
    tensors = load_file(compvis_file)
    want = load_sd(compvis_file)
    t = "cond_stage_model.transformer."
    quirky = {(t + k[len(t + "text_model."):] if k.startswith(t) else k): v.half() for k, v in tensors.items()}
    quirky[t + "embeddings.position_ids"] = torch.arange(77)[None]
    quirky.update({"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9),
                   "model_ema.num_updates": torch.tensor(5), "model_ema.diffusion_modelout2weight": torch.rand(4, 32, 3, 3)})
    torch.save({"state_dict": quirky, "global_step": 470000, "epoch": 6}, tmp_path / "real.ckpt")
    got = load_sd(tmp_path / "real.ckpt")
    for name in ckpt.PREFIX:
        for (k, a), b in zip(getattr(want, name).state_dict().items(), getattr(got, name).state_dict().values()):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a.half().float(), atol=0, rtol=0, msg=k)


def test_fp16_dtype_request(compvis_file):
    """load_sd(dtype=float16) gives fp16 weights everywhere."""
    sd = load_sd(compvis_file, dtype=torch.float16)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        assert {p.dtype for p in m.parameters()} == {torch.float16}


# ---------------------------------------------------------------------------------------------------- hostile inputs


def test_missing_file(tmp_path):
    """A path that does not exist is a one-line error naming it."""
    with pytest.raises(CheckpointError, match="no such file"):
        load_sd(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path):
    """A 0-byte file says the download did not finish."""
    (tmp_path / "e.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_sd(tmp_path / "e.ckpt")


def test_truncated_safetensors(compvis_file, tmp_path):
    """A cut-off safetensors file is reported as truncated, not a library traceback."""
    data = compvis_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sd(tmp_path / "cut.safetensors")


def test_truncated_ckpt(compvis_file, tmp_path):
    """A cut-off torch zip archive is reported as truncated."""
    torch.save(load_file(compvis_file), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sd(tmp_path / "cut.ckpt")


def test_text_file_named_ckpt(tmp_path):
    """A text file with a checkpoint's name is recognised as neither format."""
    (tmp_path / "model.ckpt").write_text("<html>404 Not Found</html>\n" * 10)
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a PyTorch checkpoint"):
        load_sd(tmp_path / "model.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['QDP_PWNED']}",))


def test_code_running_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    """A pickle whose loading would run a shell command is refused, and the command never runs."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("QDP_PWNED", str(marker))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        load_sd(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_sd2_shaped_checkpoint(compvis_file, tmp_path):
    """A state dict with SD 2.x's OpenCLIP text encoder and 1024-wide context is named as SD 2.x."""
    tensors = {k: v for k, v in load_file(compvis_file).items() if not k.startswith("cond_stage_model.")}
    tensors["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 8)
    tensors["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(32, 1024)
    save_file(tensors, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match="SD 2.x"):
        load_sd(tmp_path / "sd2.safetensors")


def test_sdxl_shaped_checkpoint(tmp_path):
    """A state dict with SDXL's two text encoders and label embedding is named as SDXL."""
    tensors = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(8, 4),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    save_file(tensors, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL"):
        load_sd(tmp_path / "xl.safetensors")


@pytest.mark.parametrize("key", ["model.diffusion_model.output_blocks.2.0.in_layers.2.weight",
                                 "first_stage_model.decoder.up.0.block.1.conv2.bias",
                                 "model.diffusion_model.out.2.weight"])
def test_checkpoint_with_a_key_removed(compvis_file, tmp_path, key):
    """A missing tensor is named in the error."""
    tensors = load_file(compvis_file)
    del tensors[key]
    save_file(tensors, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="missing|incomplete") as err:
        load_sd(tmp_path / "partial.safetensors")
    assert key.split(".", 2)[-1].split(".")[0] in str(err.value) or "out" in str(err.value)


def test_not_a_stable_diffusion_file(tmp_path):
    """A valid safetensors file of some other model says what it holds."""
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no SD v1 UNet"):
        load_sd(tmp_path / "other.safetensors")


def test_diffusers_component_file(tmp_path, refs):
    """Pointing at unet/diffusion_pytorch_model.safetensors asks for the folder instead."""
    save_file(refs[0].state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="diffusers folder"):
        load_sd(tmp_path / "diffusion_pytorch_model.safetensors")


def test_incomplete_diffusers_folder(compvis_file, tmp_path):
    """A diffusers folder without its vae weights names the missing part."""
    save_diffusers(load_sd(compvis_file), tmp_path / "d")
    os.remove(tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="vae has no weights"):
        load_sd(tmp_path / "d")


# ---------------------------------------------------------------------------------------------------- tokenizer

PROMPTS = ["a photo of sks dog", "A Photo Of SKS Dog!!", "a red   striped mug\ton the beach", "", "café à la crème",
           "a dog's toy, isn't it? (8k, ultra-detailed)", "an astronaut riding a horse on mars, 4k #art @home",
           "東京の猫 and a 🐶 emoji", "1234567890 3.14 $100", "<|startoftext|> hello <|endoftext|>"]


@pytest.mark.skipif(not TOKENIZER_REF.is_dir(), reason="needs ../shared/assets/sd15_configs/tokenizer")
def test_tokenizer_matches_sd15_reference():
    """Our shipped tokenizer gives the same ids as CLIPTokenizer built from SD v1.5's own tokenizer files."""
    from transformers import CLIPTokenizer
    ref = CLIPTokenizer.from_pretrained(str(TOKENIZER_REF), local_files_only=True)
    ids = ckpt.tokenize(ckpt.load_tokenizer(), PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, want)


def test_tokenize_pads_and_truncates_with_a_warning():
    """Ids are (B,77), start with BOS, pad with EOS; a too-long prompt is cut to 77 with a warning."""
    tok = ckpt.load_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = ckpt.tokenize(tok, "a photo of sks dog")
    assert short.shape == (1, 77) and short[0, 0] == 49406 and (short[0, 6:] == 49407).all()
    with pytest.warns(UserWarning, match="dropped: 'cat cat cat'"):
        long = ckpt.tokenize(tok, " ".join(["dog"] * 72 + ["cat"] * 6))  # 78 tokens: 3 cats too many
    assert long[0, 72] == long[0, 1] != long[0, 73] == long[0, 75]  # BOS, 72 dogs, 3 cats, EOS
    assert long.shape == (1, 77) and long[0, -1] == 49407


def test_sd_v1_text_config_is_read_back_from_shapes():
    """The full-size SD v1 text encoder (CLIP ViT-L/14's text tower) is recognised from its tensor shapes alone."""
    from transformers import CLIPTextConfig, CLIPTextModel
    real = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    with torch.device("meta"):
        sd = ckpt.canonical_text_keys(CLIPTextModel(real).state_dict())
    got = ckpt.text_config(sd)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "vocab_size", "hidden_act"):
        assert getattr(got, field) == getattr(real, field), field
