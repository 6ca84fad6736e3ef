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


def test_given_latents_match_diffusers(tiny_pipe):
    """latents= replaces the drawn x_T as diffusers' pipeline argument does; initial_noise(seed) is what the seed draws;
    a wrong shape is refused."""
    pipe, folder = tiny_pipe
    sd = ckpt.load_sd(folder)
    pipe.scheduler = reference("ddim")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    settings = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64)
    ours = sample.generate(sd, ["a cat", "a dog"], output_type="latent", latents=noise, **settings)
    ref = pipe(["a cat", "a dog"], latents=noise, output_type="latent", **settings).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    drawn = sample.generate(sd, "a cat", seed=3, output_type="latent", num_images_per_prompt=2, **settings)
    given = sample.generate(sd, "a cat", output_type="latent", num_images_per_prompt=2,
                            latents=sample.initial_noise(sd, 2, 3, height=64), **settings)
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match="latents must have shape"):
        sample.generate(sd, "a cat", latents=noise, **settings)


# --------------------------------------------------------------------------------------------------------------------
# command line


@pytest.mark.parametrize("flags,message", [
    (["--height", "60"], "multiples of 8"),
    (["--scheduler", "plms", "--eta", "0.5"], "--eta only applies"),
    (["--num_inference_steps", "1000"], "--num_inference_steps must be in"),
    (["--out", "image.txt"], "image suffix"),
    (["--export", "m.safetensors", "--export_format", "diffusers"], "writes a folder"),
    (["--export", "folder", "--export_format", "compvis"], "writes one file"),
    (["--export", "missing"], "overwrite --ckpt"),
    (["--expert", "1"], "drop --expert"),
    (["--export_dtype", "fp16"], "only apply with --export"),
    (["--guidance_scale", "nan"], "finite number"),
    (["--guidance_scale", "inf"], "finite number"),
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
    big = Image.open(out.with_name("cat_big.png"))                 # a small sample also gets a viewable copy
    assert big.size == (512, 256) and big.resize((128, 64), Image.Resampling.NEAREST).tobytes() == \
        Image.open(out).convert("RGB").tobytes()


# --------------------------------------------------------------------------------------------------------------------
# export: the tiny W4 model of test_train (quantized RTN, as quant.py writes it) and scales trained on it

import warnings  # noqa: E402

import qlayers  # noqa: E402
import quant  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_train import RES, files, run, tiny_sd  # noqa: E402, F401 (files: a module fixture)


@pytest.fixture(scope="module")
def s2_scales(files, tmp_path_factory):
    """{multi_channel: file}: 2 S2 experts trained 2 steps on t in 500..999 only, so expert 1 moved away from the
    base; with per-output-channel scales, and with TuneQDM's per-input-channel in_scales too."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # "experts [0] ... will not train": intended
        for multi in (False, True):
            out[multi], _ = run(files, tmp_path_factory.mktemp("s2"), "--n_experts", "2", "--t_range", "500,999",
                                "--max_train_steps", "2", *(["--multi_channel"] if multi else []))
    return out


def unet_inputs():
    """x (2,4,8,8), t in expert 1's half of 0..999, ctx (2,77,32)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 900]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("multi", [False, True], ids=["scale", "in_scale"])
def test_export_compvis_equals_the_personalized_model(files, s2_scales, multi, tmp_path):
    """--export of S2 scales with --expert 1 writes a plain CompVis file that ckpt.load_sd opens as a float model; its
    UNet computes what the personalized model computes at expert 1's timesteps (not the base), its VAE and text
    encoder are the base's, and nothing is sampled without --prompt. With --multi_channel's in_scales too."""
    q, out = str(files / "q.safetensors"), tmp_path / "sks.safetensors"
    sample.main(["--ckpt", q, "--scales", str(s2_scales[multi]), "--expert", "1", "--export", str(out),
                 "--export_dtype", "fp32", "--out", str(tmp_path / "x.png")])
    merged, base = ckpt.load_sd(out), ckpt.load_sd(q)
    assert not any(isinstance(m, qlayers.QuantLayer) for m in merged.unet.modules())
    personalized = ckpt.load_personalized(ckpt.load_sd(q), s2_scales[multi])
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        want = personalized.unet(x, t, ctx)
        torch.testing.assert_close(merged.unet(x, t, ctx), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base.unet(x, t, ctx), want, rtol=1e-3, atol=1e-3)
    for a, b in [(merged.vae, base.vae), (merged.text_encoder, base.text_encoder)]:
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not (tmp_path / "x.png").exists()


def test_export_diffusers_folder_opens_in_diffusers(tmp_path, capsys):
    """A W4A8 base without --scales exports to a diffusers folder that UNet2DConditionModel.from_pretrained opens;
    it computes what the W4A32 model with the same codes computes, and one warning line says that activation
    quantization is dropped."""
    diffusers = pytest.importorskip("diffusers")
    sd = tiny_sd()
    sd.unet = quant.quantize_(sd.unet, 4, 8)
    ckpt.save_quantized(sd, tmp_path / "w4a8.safetensors")
    ours = quant.quantize_(tiny_sd().unet, 4)
    sample.main(["--ckpt", str(tmp_path / "w4a8.safetensors"), "--export", str(tmp_path / "d"), "--export_dtype",
                 "fp32"])
    err = capsys.readouterr().err
    assert "warning" in err and "activations to 8 bits" in err and err.count("\n") == 1
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "d" / "unet", local_files_only=True)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, ctx).sample, ours(x, t, ctx), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "w4a8.safetensors"]    # no temporary left behind


def test_export_of_s2_scales_needs_an_expert(files, s2_scales, tmp_path, capsys):
    """S2 scales without --expert stop before any loading, with one line that says why (a merged model cannot
    switch experts by timestep) and what to do; an --expert out of range is refused too."""
    argv = ["--ckpt", str(files / "q.safetensors"), "--scales", str(s2_scales[False]), "--export",
            str(tmp_path / "m.ckpt")]
    for extra, messages in [([], ["2 S2 experts", "one set of weights for every t", "--expert K (0..1)",
                                  "or export each"]), (["--expert", "2"], ["--expert must be in 0..1"])]:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv + extra)
        last = capsys.readouterr().err.strip().splitlines()[-1]          # after argparse's usage lines
        assert exit_info.value.code == 2 and all(m in last for m in messages), last
    assert not (tmp_path / "m.ckpt").exists()


def test_export_never_overwrites_without_flag(files, tmp_path, capsys):
    """An existing --export path is left alone unless --overwrite; a folder that holds no diffusers model is never
    replaced; with --overwrite the file is replaced (fp16 by default) and --prompt samples as well."""
    q, path, folder = str(files / "q.safetensors"), tmp_path / "m.safetensors", tmp_path / "photos"
    path.write_bytes(b"keep")
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"mine")
    for argv, message in [(["--export", str(path)], "already exists"),
                          (["--export", str(folder), "--overwrite"], "holds no diffusers model")]:
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", q, *argv])
        assert message in capsys.readouterr().err
    assert path.read_bytes() == b"keep" and (folder / "cat.jpg").read_bytes() == b"mine"
    sample.main(["--ckpt", q, "--export", str(path), "--overwrite", "--prompt", "a photo of a mug", "--height",
                 str(RES), "--width", str(RES), "--num_inference_steps", "2", "--out", str(tmp_path / "x.png")])
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert Image.open(tmp_path / "x.png").size == (RES, RES)


def test_progress_off_a_terminal_is_plain_lines(capsys):
    """Off a terminal (as under pytest) a progress bar is one plain line per tenth, counting what it is told to count
    from where a resumed loop starts, and an inner loop (one image's DDIM steps) prints nothing."""
    items = list(sample.progress(range(20), "work", unit="images"))
    lines = capsys.readouterr().err.splitlines()
    assert items == list(range(20)) and len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[0].startswith("work: 2/20 images (10%) in ") and lines[-1].startswith("work: 20/20 images (100%)")
    list(sample.progress(range(5), "resumed", total=8, initial=3))
    assert capsys.readouterr().err.splitlines()[-1].startswith("resumed: 8/8 it (100%)")
    list(sample.progress(range(50), "ddim steps", inner=True))
    assert capsys.readouterr().err == ""


def test_pick_threads_leaves_busy_cores_alone(monkeypatch, capsys):
    """One torch thread per core that other jobs leave free, said in one line; OMP_NUM_THREADS, if set, wins."""
    before = torch.get_num_threads()
    monkeypatch.setattr(sample, "_THREADS_SAID", [])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sample.os, "cpu_count", lambda: 2)
    try:
        for load, want in ((1.9, 1), (1.0, 1), (0.1, 2), (7.5, 1)):
            monkeypatch.setattr(sample.os, "getloadavg", lambda: (load, load, load))
            assert sample.pick_threads() == want
        assert capsys.readouterr().err.count("threads:") == 1          # said once per process
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert sample.pick_threads() == 2                              # the user's setting is not second-guessed
    finally:
        torch.set_num_threads(before)
