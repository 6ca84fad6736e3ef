"""train.py: instance images from real folders, the timestep logic of S1 and S2, what trains, and whole runs."""
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# instance images


def _write_hostile_folder(d):
    """One file per case a user's photo folder throws at us; returns the names expected to load."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)                                      # left half red, right half blue
    rgb[:, 30:] = (0, 0, 255)
    Image.fromarray(rgb).save(d / "a_plain.jpg", quality=95)
    rgba = np.zeros((32, 32, 4), np.uint8)                        # fully transparent: must become white
    Image.fromarray(rgba, "RGBA").save(d / "b_rgba.png")
    Image.fromarray(np.full((32, 32), 128, np.uint8), "L").save(d / "c_gray.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "d_cmyk.jpg")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(d / "e_16bit.png")   # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6                                              # EXIF orientation: rotate 90 degrees clockwise
    Image.fromarray(rgb).save(d / "f_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(rgb).save(d / "g_photo.webp")
    (d / "h_not_an_image.jpg").write_text("this is text")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (d / "i_truncated.jpg").write_bytes(buf.getvalue()[:100])
    (d / "notes.txt").write_text("ignored: not an image suffix")
    Image.new("1", (20000, 20000)).save(d / "j_bomb.png")          # 400 Mpixel: over twice PIL's bomb limit
    return ["a_plain.jpg", "b_rgba.png", "c_gray.png", "d_cmyk.jpg", "e_16bit.png", "f_rotated.jpg", "g_photo.webp"]


def test_hostile_image_folder(tmp_path):
    """Every readable format loads as 8-bit upright RGB; unreadable files are skipped with a warning naming them."""
    good = _write_hostile_folder(tmp_path)
    opened = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for f in ckpt.image_files(tmp_path):
            opened[f.name] = ckpt.open_image(f)
    skipped = [str(w.message) for w in caught]
    assert sorted(n for n, im in opened.items() if im is not None) == good
    assert all(any(bad in m for m in skipped) for bad in ("h_not_an_image.jpg", "i_truncated.jpg", "j_bomb.png"))
    assert all(opened[n].mode == "RGB" for n in good)
    assert opened["b_rgba.png"].getpixel((0, 0)) == (255, 255, 255)       # transparent -> white
    assert abs(opened["e_16bit.png"].getpixel((0, 0))[0] - round(40000 / 65535 * 255)) <= 1   # rescaled, not clipped
    assert opened["f_rotated.jpg"].size == (40, 60)                        # EXIF rotation applied
    top, bottom = np.asarray(opened["f_rotated.jpg"])[5, 20], np.asarray(opened["f_rotated.jpg"])[55, 20]
    assert top[0] > 200 and bottom[2] > 200                                # red rotated to the top
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = train.load_images(ckpt.image_files(tmp_path), 16)
    assert x.shape == (len(good), 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_empty_and_unusable_folders_stop_before_work(tmp_path):
    """An empty folder, a folder of broken files and a missing folder each raise one clear TrainingError."""
    with pytest.raises(ckpt.CheckpointError, match="not a folder"):
        ckpt.image_files(tmp_path / "missing")
    assert ckpt.image_files(tmp_path) == []
    (tmp_path / "x.jpg").write_text("not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(train.TrainingError, match="no usable image"):
            train.load_images(ckpt.image_files(tmp_path), 16)


@pytest.mark.skipif(not (SHARED / "dreambooth").is_dir(), reason="needs ../shared/assets/dreambooth")
def test_real_dreambooth_folder():
    """The real DreamBooth photos (JPEGs of various sizes) load center-cropped at the requested resolution."""
    files = ckpt.image_files(SHARED / "dreambooth" / "dataset" / "dog")
    x = train.load_images(files, 64)
    assert x.shape == (len(files), 3, 64, 64) and 4 <= len(files) <= 6


# --------------------------------------------------------------------------------------------------------------------
# timesteps


def test_uniform_experts_match_the_official_rule():
    """Uniform bounds give expert floor(t*K/1000) for every t, as the official code computes it."""
    t = torch.arange(1000)
    for k in (1, 2, 3, 4, 7, 8):
        assert torch.equal(qlayers.expert_of(t, train.expert_bounds(k)), t * k // 1000)


def test_given_boundaries_and_content_interval():
    """Given inner bounds split t where they say; the default content interval is SD's SNR band [1e-2, 1]."""
    b = train.expert_bounds(3, [100, 600])
    assert qlayers.expert_of(torch.tensor([0, 99, 100, 599, 600, 999]), b).tolist() == [0, 0, 1, 1, 2, 2]
    lo, hi = train.content_interval()
    import sample
    a = sample.alphas_cumprod()
    snr = a / (1 - a)
    assert snr[lo] <= 1 and snr[lo - 1] > 1 and snr[hi] >= 1e-2 and snr[hi + 1] < 1e-2


def test_auto_interval_picks_the_fifth_where_the_prompt_moves_the_prediction_most():
    """--t_range auto scores each fifth by the prompt's pull on the noise prediction (conditional minus empty
    prompt) relative to the prediction's error, and keeps the best fifth; the scores are the model's, not the order;
    a prompt that moves nothing leaves all of t."""
    import sample

    def model_pulled_in(lo, hi):
        def model(x, t, ctx):                 # predicts a constant: w(t) times the context's mean (0 for no prompt)
            w = torch.where((t >= lo) & (t <= hi), 2.0, 0.1).view(-1, 1, 1, 1)
            return w * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1) * torch.ones_like(x)
        return model
    g = torch.Generator().manual_seed(0)
    data = dict(inst_mean=torch.randn(3, 4, 8, 8, generator=g), inst_std=torch.full((3, 4, 8, 8), 0.1),
                alphas_cumprod=sample.alphas_cumprod(), inst_ctx=torch.ones(1, 2, 3), null_ctx=torch.zeros(1, 2, 3))
    for lo, hi in ((200, 399), (800, 999)):
        chosen, rows = train.auto_interval(model_pulled_in(lo, hi), data)
        assert chosen == [lo, hi] and [r["t_range"] for r in rows] == [(k, k + 199) for k in range(0, 1000, 200)]
        pulled = [r["score"] for r in rows if r["t_range"] == (lo, hi)][0]
        # influence = w^2 / (w^2 + |noise|^2): about 4/5 where w = 2, about 0.01 elsewhere
        assert pulled == pytest.approx(0.8, abs=0.05) and all(r["score"] < 0.02 for r in rows if r["score"] != pulled)
    with pytest.warns(UserWarning, match="all of 0..999"):            # a prompt that changes nothing: all of t
        assert train.auto_interval(model_pulled_in(0, 999), dict(data, inst_ctx=data["null_ctx"]))[0] == [0, 999]


# --------------------------------------------------------------------------------------------------------------------
# runs on a tiny quantized model

import ckpt  # noqa: E402
import qlayers  # noqa: E402
import quant  # noqa: E402
import refs  # noqa: E402
import unet as unet_lib  # noqa: E402
import vae as vae_lib  # noqa: E402

RES = 32  # pixels: 4x4 latents through the tiny UNet


def tiny_sd():
    u = refs.randomize_(unet_lib.UNet(unet_lib.tiny()), 0, std=0.05)
    v = refs.randomize_(vae_lib.AutoencoderKL(refs.VAE), 1, std=0.05)
    return ckpt.StableDiffusion(u, v, refs.clip_text(), ckpt.load_tokenizer())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny W4 model (RTN) as quant.py writes it, its FP original, and a folder of 3 instance photos."""
    d = tmp_path_factory.mktemp("train")
    sd = tiny_sd()
    ckpt.save_compvis(sd, d / "fp.safetensors")
    sd.unet = quant.quantize_(sd.unet, 4)
    ckpt.save_quantized(sd, d / "q.safetensors")
    (d / "photos").mkdir()
    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / "photos" / f"{i:02d}.jpg")
    return d


def run(files, out, *flags):
    argv = ["--ckpt", str(files / "q.safetensors"), "--instance_data_dir", str(files / "photos"),
            "--instance_prompt", "a photo of sks mug", "--resolution", str(RES), "--output_dir", str(out),
            "--max_train_steps", "3", "--learning_rate", "1e-3", *flags]
    args = train.parse_args(argv)
    return train.personalize(args)


def quant_state(path):
    return ckpt.load_sd(path).unet.state_dict()


def test_peqa_trains_only_the_scales(files, tmp_path):
    """PEQA's output holds every weight scale and nothing else; applied to the base, only those scales differ."""
    out, losses = run(files, tmp_path / "run")
    base = quant_state(files / "q.safetensors")
    sd = ckpt.load_personalized(ckpt.load_sd(files / "q.safetensors"), out, files / "q.safetensors")
    after = sd.unet.state_dict()
    changed = sorted(k for k in base if not torch.equal(base[k], after[k]))
    expected = sorted(n for n in base if ".weight_quantizer" in n and n.endswith(".scale"))
    assert changed == expected and len(losses) == 3


def test_multi_channel_trains_scales_and_in_scales(files, tmp_path):
    """--multi_channel adds a trained in_scale to every weight quantizer (one per input channel, each part of a split
    layer its own); applied to the base, the scales change, the in_scales appear, and nothing else moves."""
    out, _ = run(files, tmp_path / "mc", "--multi_channel")
    base = quant_state(files / "q.safetensors")
    sd = ckpt.load_personalized(ckpt.load_sd(files / "q.safetensors"), out, files / "q.safetensors")
    after = sd.unet.state_dict()
    scales = sorted(n for n in base if ".weight_quantizer" in n and n.endswith(".scale"))
    assert sorted(set(after) - set(base)) == sorted(n[:-len("scale")] + "in_scale" for n in scales)
    assert sorted(k for k in base if not torch.equal(base[k], after[k])) == scales
    for n in scales:
        in_scale, w_int = after[n[:-len("scale")] + "in_scale"], after[n[:-len("scale")] + "w_int"]
        assert in_scale.shape[:2] == (1, sd.unet.get_submodule(n[:-len(".scale")]).shape[1])
        assert not torch.equal(in_scale, torch.ones_like(in_scale)) and w_int.dtype == torch.uint8


def test_full_trains_every_weight(files, tmp_path):
    """--method full on the FP checkpoint moves every UNet weight and writes only UNet tensors."""
    argv = ["--method", "full", "--ckpt", str(files / "fp.safetensors"), "--instance_data_dir", str(files / "photos"),
            "--instance_prompt", "a photo of sks mug", "--resolution", str(RES), "--output_dir",
            str(tmp_path / "full"), "--max_train_steps", "2", "--learning_rate", "1e-3"]
    out, _ = train.personalize(train.parse_args(argv))
    base = ckpt.load_sd(files / "fp.safetensors").unet.state_dict()
    from safetensors.torch import load_file
    trained = load_file(out)
    assert sorted(trained) == sorted(base)
    assert all(not torch.equal(base[k], trained[k]) for k in base if "norm" not in k)


def test_experts_are_independent(files, tmp_path):
    """With t drawn only from expert 1's interval, experts 0, 2 and 3 stay bit-identical to the base scales:
    no AdamW momentum, no weight decay reaches an expert that got no gradient."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, _ = run(files, tmp_path / "s2", "--n_experts", "4", "--t_range", "250,499", "--adam_weight_decay", "0.1")
    from safetensors.torch import load_file
    trained, base = load_file(out), quant_state(files / "q.safetensors")
    for k in range(4):
        same = [torch.equal(v, base[n.split(".", 2)[2]]) for n, v in trained.items() if n.startswith(f"expert.{k}.")]
        assert all(same) if k != 1 else not any(same), k


@pytest.mark.parametrize("multi", [False, True], ids=["scale", "in_scale"])
def test_routing_in_a_batch_matches_one_by_one(files, multi):
    """A batch whose samples belong to different experts gives the outputs and the scale gradients of running
    each sample alone with its own expert (with --multi_channel, the in_scale gradients too)."""
    sd = ckpt.load_sd(files / "q.safetensors")
    model, params = train.trainable(sd, "peqa", 4, train.expert_bounds(4), multi)
    assert any(n.endswith(".in_scale") for n in params) == multi
    with torch.no_grad():                       # make the experts differ
        for n, p in params.items():
            p.mul_(1 + 0.1 * int(n.split(".")[1]))
    g = torch.Generator().manual_seed(0)
    batch = dict(x_t=torch.randn(4, 4, 4, 4, generator=g), t=torch.tensor([900, 10, 600, 300]),
                 ctx=torch.randn(4, 77, 32, generator=g), noise=torch.randn(4, 4, 4, 4, generator=g),
                 weight=torch.tensor([0.5, 0.5, 0.25, 0.25]))
    with torch.no_grad():
        together = model(batch["x_t"], batch["t"], batch["ctx"])
        alone = torch.cat([model(batch["x_t"][i:i + 1], batch["t"][i:i + 1], batch["ctx"][i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    loss, _ = train.train_step(model, batch)
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    total = 0
    for i in range(4):
        total += train.train_step(model, {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in batch.items()})[0]
    assert sorted(grads) == sorted(n for n, p in params.items() if p.grad is not None)
    for n, gr in grads.items():
        torch.testing.assert_close(gr, params[n].grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, total)


def test_resume_equals_uninterrupted(files, tmp_path):
    """A run stopped after 2 of 4 steps and resumed ends bit-identical to one that ran 4 steps straight (CPU)."""
    flags = ("--with_prior_preservation", "--class_prompt", "a photo of a mug", "--class_data_dir",
             str(tmp_path / "class"), "--num_class_images", "2", "--checkpointing_steps", "2", "--n_experts", "2",
             "--class_inference_steps", "3")
    straight, _ = run(files, tmp_path / "a", "--max_train_steps", "4", *flags)
    run(files, tmp_path / "b", "--max_train_steps", "2", *flags)
    resumed, _ = run(files, tmp_path / "b", "--max_train_steps", "4", "--resume", *flags)
    from safetensors.torch import load_file
    a, b = load_file(straight), load_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_interval_chooses_before_training_and_resume_keeps_the_choice(files, tmp_path, monkeypatch):
    """--t_range auto (no prior preservation needed): the choice is the best-scoring fifth, measuring it leaves the
    training run as it is (the run equals one given that interval by hand), and --resume reuses it without
    measuring again."""
    flags = ("--checkpointing_steps", "2")
    auto, _ = run(files, tmp_path / "auto", "--max_train_steps", "4", "--t_range", "auto", *flags)
    import json
    chosen = json.loads((tmp_path / "auto" / "auto_interval.json").read_text())
    assert len(chosen["parts"]) == train.AUTO_PARTS
    assert chosen["t_range"] == max(chosen["parts"], key=lambda r: r["score"])["t_range"]
    by_hand, _ = run(files, tmp_path / "hand", "--max_train_steps", "4", "--t_range", ",".join(map(str,
                     chosen["t_range"])), *flags)
    from safetensors.torch import load_file
    a, b = load_file(auto), load_file(by_hand)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run(files, tmp_path / "b", "--max_train_steps", "2", "--t_range", "auto", *flags)
    monkeypatch.setattr(train, "auto_interval", lambda *a, **k: pytest.fail("chosen again on --resume"))
    resumed, _ = run(files, tmp_path / "b", "--max_train_steps", "4", "--t_range", "auto", "--resume", *flags)
    c = load_file(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_state(files, tmp_path, monkeypatch):
    """A non-finite loss stops the run with a TrainingError, and the last good state stays on disk."""
    real = train.train_step
    calls = []

    def poisoned(model, batch, *precision):
        calls.append(1)
        loss, mse = real(model, batch, *precision)
        return (loss * float("nan"), mse) if len(calls) == 3 else (loss, mse)
    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(train.TrainingError, match="nan"):
        run(files, tmp_path / "nan", "--max_train_steps", "5", "--checkpointing_steps", "1")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "nan" / train.STATE_FILE), "pt") as f:
        assert f.metadata()["step"] == "2"


def test_nan_stop_advice_can_be_followed(files, tmp_path, monkeypatch):
    """The NaN stop names the saved state and its step (or says none was saved), NaN parameters are never saved over
    the last good state, and `--resume` with a lower learning rate finishes the run, while a higher one is refused."""
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda m, b, *p: (real(m, b, *p)[0] * float("nan"), real(m, b, *p)[1]))
    with pytest.raises(train.TrainingError, match="no state was saved yet: rerun with a lower --learning_rate"):
        run(files, tmp_path / "first", "--max_train_steps", "3")
    monkeypatch.setattr(train, "train_step", real)
    out = tmp_path / "run"
    run(files, out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    good = (out / train.STATE_FILE).read_bytes()
    params = {"w": torch.nn.Parameter(torch.tensor([1.0, float("nan")]))}
    with pytest.raises(train.TrainingError, match=r"NaN or inf at step 3 .*last good state \(step 2\)"):
        train.save_state(out / train.STATE_FILE, params, torch.optim.AdamW(params.values()), torch.Generator(), 3, {})
    assert (out / train.STATE_FILE).read_bytes() == good
    with pytest.raises(train.TrainingError, match="other settings"):
        run(files, out, "--max_train_steps", "3", "--resume", "--learning_rate", "2e-3")
    path, losses = run(files, out, "--max_train_steps", "3", "--resume", "--learning_rate", "5e-4")
    assert path.is_file() and len(losses) == 1


def test_a_run_folder_in_use_is_refused(files, tmp_path):
    """While one run holds --output_dir (or the class folder it is drawing class images into), another is refused,
    naming the holder; a class folder whose images are all drawn is shared; a holder killed with SIGKILL leaves the
    folder free."""
    with train.folder_lock(tmp_path / "busy", "--output_dir"):
        with pytest.raises(train.TrainingError, match=f"in use by another running train.py \\(process {os.getpid()}"):
            run(files, tmp_path / "busy")
        with pytest.raises(train.TrainingError, match="--class_data_dir .* in use"):
            run(files, tmp_path / "other", "--with_prior_preservation", "--class_prompt", "a mug",
                "--class_data_dir", str(tmp_path / "busy"))
    shared = ["--with_prior_preservation", "--class_prompt", "a mug", "--class_data_dir", str(tmp_path / "mugs"),
              "--num_class_images", "2", "--class_inference_steps", "2"]
    run(files, tmp_path / "first", *shared)                   # draws the class images
    with train.folder_lock(tmp_path / "mugs", "--class_data_dir"):   # a run of the same class, still training
        path, _ = run(files, tmp_path / "second", *shared)     # finished class images are only read: not refused
    assert path.is_file()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train; "
                               "lock = train.folder_lock(sys.argv[1], 'x'); lock.__enter__(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "killed")], cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(train.TrainingError, match="in use"):
        run(files, tmp_path / "killed")
    holder.kill()
    holder.wait()
    path, _ = run(files, tmp_path / "killed", "--max_train_steps", "1")
    assert path.is_file()


def test_default_learning_rate_follows_the_scale_size(files):
    """PEQA's default lr is W4's, times 15/255 at W8, where every scale is 15/255 as large; full keeps its own."""
    sd = tiny_sd()
    lrs = {}
    for bits in (4, 8):
        sd.unet = quant.quantize_(tiny_sd().unet, bits)
        args = train.parse_args(["--instance_data_dir", str(files / "photos"), "--instance_prompt", "a sks mug",
                                 "--output_dir", "unused"])
        train.resolve_defaults(args, sd)
        lrs[bits] = args.learning_rate
    assert lrs[4] == train.REAL_DEFAULTS["learning_rate"]
    assert lrs[8] == pytest.approx(lrs[4] * 15 / 255)


def test_pinned_first_losses(files, tmp_path):
    """The first losses of a seeded tiny run with prior preservation: a change to the maths moves them."""
    _, losses = run(files, tmp_path / "pin", "--with_prior_preservation", "--class_prompt", "a photo of a mug",
                    "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2",
                    "--class_inference_steps", "3")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(PINNED), rtol=1e-4, atol=1e-6)


PINNED = [1.6525359, 1.5822935, 1.9140030]


def test_class_images_resume_identically(files, tmp_path):
    """Class image i always comes from seed + i: deleting one and generating again restores the same pixels."""
    sd = ckpt.load_sd(files / "q.safetensors")
    paths = train.generate_class_images(sd, "a photo of a mug", tmp_path, 2, seed=3, height=RES, width=RES,
                                        num_inference_steps=5)
    first = paths[1].read_bytes()
    paths[1].unlink()
    again = train.generate_class_images(sd, "a photo of a mug", tmp_path, 2, seed=3, height=RES, width=RES,
                                        num_inference_steps=5)
    assert again[1].read_bytes() == first and len(again) == 2


@pytest.mark.parametrize("flags,message", [
    (["--with_prior_preservation", "--class_prompt", "a dog"], "needs --class_data_dir"),
    (["--with_prior_preservation", "--class_data_dir", "x"], "needs --class_prompt"),
    (["--t_range", "500,100"], "--t_range needs"),
    (["--t_range", "abc"], "--t_range takes"),
    (["--expert_boundaries", "500,100"], "must increase"),
    (["--expert_boundaries", "500", "--n_experts", "4"], "make 2 experts"),
    (["--method", "full", "--n_experts", "2"], "needs --method peqa"),
    (["--method", "full", "--multi_channel"], "needs --method peqa"),
    (["--max_train_steps", "0"], "at least 1"),
    (["--learning_rate", "nan"], "positive and finite"),
    (["--learning_rate", "inf"], "positive and finite"),
    (["--prior_loss_weight", "nan"], "--prior_loss_weight must be a finite number"),
    (["--resolution", "63"], "multiple of 8"),
    (["--resolution", "7"], "multiple of 8"),
    (["--resolution", "0"], "multiple of 8"),
    (["--output_dir", __file__], "is a file, not a folder"),
    (["--output_dir", __file__ + "/o"], "is a file, so nothing can be written under it"),
])
def test_cli_rejects_bad_flags(flags, message, tmp_path, capsys):
    """Each inconsistent flag combination stops right after parsing with a message that says what to do."""
    with pytest.raises(SystemExit):
        train.parse_args(["--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks dog",
                          "--output_dir", str(tmp_path / "o"), *flags])
    assert message in capsys.readouterr().err


def test_keyword_settings_equal_the_command_line(tmp_path):
    """train.parse_args(**settings) and quant.parse_args(**settings) give what the same flags give (switches, --no-
    switches, numbers and paths), and a misspelt setting is a TypeError that lists the right names."""
    need = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks dog",
            "--output_dir", str(tmp_path / "o")]
    cli = train.parse_args(need + ["--with_prior_preservation", "--class_prompt", "a photo of a dog",
                                   "--class_data_dir", str(tmp_path / "c"), "--n_experts", "4",
                                   "--no-gradient_checkpointing", "--learning_rate", "1e-3"])
    kw = train.parse_args(instance_data_dir=tmp_path, instance_prompt="a photo of sks dog", output_dir=tmp_path / "o",
                          with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=tmp_path / "c",
                          n_experts=4, gradient_checkpointing=False, learning_rate=1e-3, resume=False,
                          max_train_steps=None)
    assert vars(kw) == vars(cli)
    with pytest.raises(TypeError, match="unknown setting 'n_expert'.*n_experts"):
        train.parse_args(instance_data_dir=tmp_path, instance_prompt="x", output_dir=tmp_path / "o", n_expert=4)
    q = tmp_path / "q.safetensors"
    assert vars(quant.parse_args(wbits=8, abits=32, out=q, overwrite=True)) == \
        vars(quant.parse_args(["--wbits", "8", "--abits", "32", "--out", str(q), "--overwrite"]))


@pytest.mark.parametrize("multi", [False, True], ids=["scale", "in_scale"])
def test_sample_cli_with_scales(files, tmp_path, multi):
    """sample.py --scales draws from the personalized model (S2; with --multi_channel each expert has its own
    in_scales too); a scales file from another base is refused."""
    out, _ = run(files, tmp_path / "s", "--n_experts", "2", *(["--multi_channel"] if multi else []))
    from safetensors.torch import load_file
    names = list(load_file(out))
    for k in range(2):
        in_scales = [n for n in names if n.startswith(f"expert.{k}.") and n.endswith(".in_scale")]
        assert len(in_scales) == (len(names) // 4 if multi else 0)
    import sample
    sample.main(["--ckpt", str(files / "q.safetensors"), "--scales", str(out), "--prompt", "a photo of sks mug",
                 "--height", str(RES), "--width", str(RES), "--num_inference_steps", "3", "--out",
                 str(tmp_path / "x.png")])
    assert Image.open(tmp_path / "x.png").size == (RES, RES)
    with pytest.raises(ckpt.CheckpointError, match="another base model"):
        ckpt.load_personalized(ckpt.load_sd(files / "q.safetensors"), out, files / "fp.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(files / "q.safetensors"), "pt") as f:     # the same base made again: other timings, same
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}             # tensors: accepted
    info = json.loads(meta["qdp.quant"])
    save_file(tensors, str(tmp_path / "again.safetensors"),
              metadata={**meta, "qdp.quant": json.dumps({**info, "quant_seconds": info.get("quant_seconds", 0) + 1})})
    ckpt.load_personalized(ckpt.load_sd(tmp_path / "again.safetensors"), out, tmp_path / "again.safetensors")


@pytest.mark.parametrize("method", ["peqa", "full"])
def test_bf16_mixed_precision_matches_fp32(files, tmp_path, method):
    """--mixed_precision bf16 (autocast, here on the CPU) trains the same tensors, which stay float32, and its first
    losses match the float32 run's within 3% (bf16 keeps 8 bits of mantissa)."""
    from safetensors.torch import load_file
    flags = [] if method == "peqa" else ["--ckpt", str(files / "fp.safetensors"), "--method", "full"]
    p32, l32 = run(files, tmp_path / "fp32", *flags)
    p16, l16 = run(files, tmp_path / "bf16", *flags, "--mixed_precision", "bf16")
    a, b = load_file(p32), load_file(p16)
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in b.values())
    torch.testing.assert_close(torch.tensor(l16), torch.tensor(l32), rtol=0.03, atol=1e-4)
    assert any(not torch.equal(a[k], b[k]) for k in a)                 # it did compute in another precision


def test_default_quantized_base_follows_the_toy_model(tmp_path, monkeypatch):
    """The cached W4A8 toy base is reused while its stored base_sha256 is the shipped toy model's, and made again
    (replacing it) when the toy model changed, e.g. after a checkout that retrained it."""
    from safetensors.torch import save_file
    calls = []
    monkeypatch.setattr(train.quant, "quantize", lambda **settings: calls.append(settings))
    path = tmp_path / "toy_w4a8.safetensors"
    for sha in (train.ckpt.sha256(ckpt.TOY_CKPT), "0" * 64):
        save_file({"x": torch.zeros(1)}, str(path), metadata={"qdp.quant": json.dumps({"base_sha256": sha})})
        assert train.default_quantized(path) == path
    assert len(calls) == 1 and calls[0]["overwrite"] and calls[0]["out"] == path
