"""sample.py against diffusers: the schedule, each sampler step, classifier-free guidance, the denoising loop, and whole
text-to-image runs of a tiny random pipeline loaded through ckpt.load_sd."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from PIL import Image

import ckpt
import refs
import sample
import vae as vae_lib

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, set_alpha_to_one=False)


def reference(scheduler, n=None):
    """diffusers' scheduler with SD v1's config, as StableDiffusionPipeline runs it."""
    ref = DDIMScheduler(**SD_SCHEDULE, clip_sample=False) if scheduler == "ddim" else \
        PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
    if n is not None:
        ref.set_timesteps(n)
    return ref


def toy_unet(x, t, ctx):
    """A stand-in for the UNet: each sample's output depends on its own x, t and ctx, and on nothing else."""
    return torch.tanh(x * ctx.mean(dim=(1, 2))[:, None, None, None] + torch.cos(t.float() / 100)[:, None, None, None])


class RecordingUNet:
    """toy_unet that keeps the inputs of every call."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, t, ctx):
        self.inputs.append((x, t, ctx))
        return toy_unet(x, t, ctx)


# --------------------------------------------------------------------------------------------------------------------
# schedule and steps


def test_alphas_cumprod_match_diffusers():
    """alpha_bar equals diffusers' scaled_linear schedule bit for bit (both float32 throughout)."""
    torch.testing.assert_close(sample.alphas_cumprod(), reference("ddim").alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 50, 999])
def test_timesteps_match_diffusers(n):
    """DDIM's timesteps are diffusers' DDIM timesteps; PLMS's are PNDM's (n+1 of them, the second one repeated)."""
    assert sample.ddim_timesteps(n) == reference("ddim", n).timesteps.tolist()
    assert sample.plms_timesteps(n) == reference("plms", n).timesteps.tolist()


def test_1000_steps_rejected():
    """n=1000 is refused: with steps_offset=1 the first timestep would be 1000, one past the end of the schedule."""
    assert reference("ddim", 1000).timesteps[0] == 1000
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample.ddim_timesteps(1000)


@pytest.mark.parametrize("scheduler,n,eta", [("ddim", 10, 0.0), ("ddim", 50, 0.0), ("ddim", 10, 0.5),
                                             ("ddim", 50, 1.0), ("plms", 1, 0.0), ("plms", 2, 0.0),
                                             ("plms", 10, 0.0), ("plms", 50, 0.0)])
def test_steps_match_diffusers(scheduler, n, eta):
    """Fed the same random eps at every step, our sampler and diffusers' step() agree along the whole trajectory
    (PLMS: the eps history matters; DDIM eta>0: the noise comes from identically seeded generators)."""
    gen, ref_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours = sample.DDIM(n, eta, gen) if scheduler == "ddim" else sample.PLMS(n)
    ref = reference(scheduler, n)
    kwargs = dict(eta=eta, generator=ref_gen) if scheduler == "ddim" else {}
    x = x_ref = torch.randn(2, 4, 8, 8)
    assert ours.timesteps == ref.timesteps.tolist()
    for t in ours.timesteps:
        eps = torch.randn(2, 4, 8, 8)
        x, x_ref = ours.step(x, eps, t), ref.step(eps, t, x_ref, **kwargs).prev_sample
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # same float32 ops in the same order


# --------------------------------------------------------------------------------------------------------------------
# guidance and the loop


def test_guidance_is_one_batched_forward():
    """Guided eps from one forward on [uncond, cond] equals eps_u + g (eps_c - eps_u) from two separate forwards;
    guidance_scale <= 1 runs the conditional half only."""
    x, ctx, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32), torch.randn(3, 77, 32)
    unet = RecordingUNet()
    eps = sample.guided_eps(unet, x, 501, ctx, uncond, 7.5)
    t = torch.full((3,), 501)
    eps_u, eps_c = toy_unet(x, t, uncond), toy_unet(x, t, ctx)
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u))
    torch.testing.assert_close(sample.guided_eps(unet, x, 501, ctx, None, 1.0), eps_c, rtol=0, atol=0)
    assert [x.shape[0] for x, t, ctx in unet.inputs] == [6, 3]


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 0.8), ("plms", 0.0)])
def test_sample_latents_matches_diffusers_loop(scheduler, eta):
    """sample_latents reproduces StableDiffusionPipeline's loop (same UNet, CFG on [uncond, cond], eta noise drawn
    from the generator after x_T), and its callback sees each UNet forward's exact inputs."""
    n, g = 6, 5.0
    ctx, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn((2, 4, 8, 8), generator=gen)
    unet, seen = RecordingUNet(), []
    out = sample.sample_latents(unet, ctx, uncond, x_T, n, g, scheduler, eta, gen, callback=lambda *a: seen.append(a))

    ref_gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, 4, 8, 8), generator=ref_gen)
    ref = reference(scheduler, n)
    kwargs = dict(eta=eta, generator=ref_gen) if scheduler == "ddim" else {}
    for t in ref.timesteps:
        eps_u, eps_c = toy_unet(torch.cat([x, x]), t.expand(4), torch.cat([uncond, ctx])).chunk(2)
        x = ref.step(eps_u + g * (eps_c - eps_u), t, x, **kwargs).prev_sample
    torch.testing.assert_close(out, x, rtol=0, atol=0)

    assert [s[0] for s in seen] == list(range(len(ref.timesteps)))
    for (i, t, x_in, c), (ux, ut, uc) in zip(seen, unet.inputs, strict=True):
        assert x_in is ux and t is ut and c is uc
        assert t.dtype == torch.long and t.tolist() == [ref.timesteps[i].item()] * 4
        torch.testing.assert_close(c, torch.cat([uncond, ctx]), rtol=0, atol=0)


def test_vae_scale_factor_comes_from_the_model():
    """Latent size follows the VAE: 8x for SD v1's four levels, 2x for the two-level tiny preset."""
    with torch.device("meta"):
        assert sample.vae_scale_factor(vae_lib.AutoencoderKL(vae_lib.sd_v1())) == 8
        assert sample.vae_scale_factor(vae_lib.AutoencoderKL(vae_lib.tiny())) == 2


# --------------------------------------------------------------------------------------------------------------------
# end to end: a tiny random diffusers pipeline, saved and loaded through ckpt.load_sd


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """A tiny StableDiffusionPipeline with random weights (tests/refs.py: VAE factor 8, 32-wide CLIP) and the SD v1
    tokenizer shipped in assets/ (test_ckpt checks it against SD v1.5's own files), and the diffusers folder it saves."""
    tokenizer = ckpt.load_tokenizer()
    pipe = StableDiffusionPipeline(vae=refs.diffusers_vae(), text_encoder=refs.clip_text(), tokenizer=tokenizer,
                                   unet=refs.diffusers_unet(), scheduler=reference("plms"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.mark.parametrize("scheduler,eta,prompt,negative,n_images,g", [
    ("ddim", 0.0, "a photo of a cat", "", 1, 7.5),
    ("ddim", 0.7, "a photo of a cat", "blurry, low quality", 2, 7.5),
    ("plms", 0.0, ["a dog on the beach", "a red car"], ["", "blurry"], 2, 5.0),
    ("ddim", 0.0, "a photo of a cat", "", 1, 1.0),
])
def test_generate_matches_diffusers(tiny_pipe, scheduler, eta, prompt, negative, n_images, g):
    """From the same weights and seed, generate() gives diffusers' latents and images (mean |diff| < 1/255), for
    both samplers, eta > 0, several prompts and images per prompt (batching and generator order), and no guidance."""
    pipe, folder = tiny_pipe
    sd = ckpt.load_sd(folder)
    pipe.scheduler = reference(scheduler)
    settings = dict(negative_prompt=negative, num_inference_steps=5, guidance_scale=g, height=64, width=64,
                    eta=eta, num_images_per_prompt=n_images)
    latents = sample.generate(sd, prompt, seed=4, scheduler=scheduler, output_type="latent", **settings)
    images = sample.decode_images(sd, latents)
    ref_latents = []

    def catch(pipe, i, t, tensors):  # the pipeline's latents after each step
        ref_latents.append(tensors["latents"])
        return {}

    ref = pipe(prompt, generator=torch.Generator().manual_seed(4), output_type="np", callback_on_step_end=catch,
               **settings).images
    torch.testing.assert_close(latents, ref_latents[-1], rtol=1e-4, atol=1e-4)
    assert len(images) == len(ref) == n_images * (1 if isinstance(prompt, str) else len(prompt))
    ours_np = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    assert np.abs(ours_np - ref).mean() < 1 / 255


# --------------------------------------------------------------------------------------------------------------------
# command line


@pytest.mark.parametrize("flags,message", [
    (["--height", "60"], "multiples of 8"),
    (["--scheduler", "plms", "--eta", "0.5"], "--eta only applies"),
    (["--num_inference_steps", "1000"], "--num_inference_steps must be in"),
    (["--out", "image.txt"], "image suffix"),
])
def test_cli_rejects_bad_flags(flags, message, capsys):
    """A contradictory or invalid flag stops the CLI before any loading, with a message that says what to fix."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", "missing", "--prompt", "a cat", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_smoke(tiny_pipe, tmp_path):
    """Two PLMS steps through the CLI write one PNG grid holding both images side by side."""
    out = tmp_path / "out" / "cat.png"
    sample.main(["--ckpt", str(tiny_pipe[1]), "--prompt", "a cat", "--height", "64", "--width", "64",
                 "--num_inference_steps", "2", "--scheduler", "plms", "--num_images_per_prompt", "2",
                 "--device", "cpu", "--out", str(out)])
    assert Image.open(out).size == (128, 64)
