"""The toy world's pretraining loop and the shipped toy models."""
import json
from dataclasses import replace

import pytest
import torch

import ckpt
import eval as metrics
from toyworld import toy
import unet as unet_lib
import vae as vae_lib
from toyworld import world


@pytest.fixture(scope="module")
def data():
    return toy.Data(64, seed=0)


def vae_loss(model, data):
    def loss_fn(step):
        _, x, _ = data.batch(step, 8, seed=1)
        mean, _ = model.encode(x[:, :, :32, :32])
        return (model.decode(mean) - x[:, :, :32, :32]).abs().mean()
    return loss_fn


def test_batches_are_a_function_of_the_step(data):
    """A resumed run sees the same batches as an uninterrupted one: batch(step) depends on (seed, step) only."""
    a, b = data.batch(5, 4, seed=3), data.batch(5, 4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], data.batch(6, 4, seed=3)[0])


def test_pretraining_lowers_the_loss(data, tmp_path):
    """A few dozen steps on a tiny VAE bring the reconstruction loss well down."""
    torch.manual_seed(0)
    model = vae_lib.AutoencoderKL(vae_lib.tiny())
    losses = toy.fit("vae", model, vae_loss(model, data), steps=40, lr=3e-3, out=tmp_path)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resume_equals_uninterrupted(data, tmp_path):
    """Killed after a checkpoint and rerun, fit ends with bit-identical weights to a run that was never stopped."""
    def run(out, stop_at=None):
        torch.manual_seed(0)
        model = vae_lib.AutoencoderKL(vae_lib.tiny())
        inner = vae_loss(model, data)

        def loss_fn(step):
            if step == stop_at:
                raise KeyboardInterrupt
            return inner(step)
        try:
            toy.fit("vae", model, loss_fn, steps=8, lr=3e-3, out=out, save_every=4)
        except KeyboardInterrupt:
            return None
        return model

    whole = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=6) is None      # dies after the step-4 checkpoint
    resumed = run(tmp_path / "b")
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_unet_stage_runs_end_to_end(data, tmp_path):
    """The UNet stage (text tower, VAE latents, min-SNR loss, EMA) runs on a small data set, checkpoints its last
    step, and returns finite EMA weights that moved away from their initial values."""
    from transformers import CLIPModel
    plan = toy.Plan(unet_steps=6, unet_batch=4)
    vae = vae_lib.AutoencoderKL(vae_lib.toy()).eval()
    text = toy.text_tower(CLIPModel(toy.clip_config()).eval())
    torch.manual_seed(plan.seed + 3)
    init = unet_lib.UNet(unet_lib.toy()).state_dict()
    ema = toy.train_unet(data, vae, text, plan, tmp_path)
    assert torch.load(tmp_path / "unet.pt", weights_only=True)["step"] == 6
    weights = ema.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], init[k]) for k in init)


def test_shipped_toy_model_loads_through_the_normal_loader():
    """assets/toy holds the embedded default: it loads with ckpt.load_sd as the toy presets, and the evaluators load."""
    sd = ckpt.load_sd(ckpt.TOY_CKPT)
    assert sd.unet.config == unet_lib.toy()
    assert sd.vae.config.ch_mult == vae_lib.toy().ch_mult and sd.vae.config.norm_groups == vae_lib.toy().norm_groups
    assert sd.text_encoder.config.hidden_size == sd.unet.config.context_dim
    clip, dino = metrics.read_toy_evaluators()
    assert clip.config.vision_config.image_size == toy.SIZE and dino.config.image_size == toy.SIZE


def test_shipped_toy_files_stay_small():
    """Every shipped toy weight file together is at most 40 MB."""
    total = sum(p.stat().st_size for p in toy.ASSETS.glob("*.safetensors"))
    assert 0 < total <= 40e6


# --------------------------------------------------------------------------------------------------------------------
# the ceiling chain's metrics on known cases


def test_retrieval_scores_the_ceiling_and_chance():
    """Embeddings that separate the labels retrieve perfectly; identical embeddings (a constant image) score exactly
    the chance that retrieval reports, leave-one-out or not."""
    labels = ["a", "a", "b", "b", "b", "c"]
    onehot = torch.eye(3)[[0, 0, 1, 1, 1, 2]]
    hit, chance = toy.retrieval(onehot[:5], onehot, labels[:5], labels, exclude=list(range(5)))
    assert hit == 1.0
    assert chance == pytest.approx((1 / 5 + 1 / 5 + 2 / 5 + 2 / 5 + 2 / 5) / 5)
    same = torch.ones(6, 4) / 2
    hit, chance = toy.retrieval(same, same, labels, labels, exclude=list(range(6)))
    assert hit == pytest.approx(chance)
    hit, chance = toy.retrieval(same[:2], same, ["c", "b"], labels)
    assert hit == pytest.approx(chance) == pytest.approx((1 / 6 + 3 / 6) / 2)


def test_psnr_of_a_perfect_and_a_known_reconstruction():
    from PIL import Image
    a = [Image.new("RGB", (8, 8), (100, 100, 100))]
    assert toy.psnr_mae(a, a) == (float("inf"), 0.0)
    b = [Image.new("RGB", (8, 8), (110, 100, 90))]       # |error| 10 on two channels of three
    psnr, mae = toy.psnr_mae(a, b)
    assert mae == pytest.approx(20 / 3, abs=1e-3)
    assert psnr == pytest.approx(10 * torch.log10(torch.tensor(255.0 ** 2 / (200 / 3))).item(), abs=1e-3)


@pytest.fixture(scope="module")
def evaluators():
    return metrics.load_evaluators()


def test_a_perfect_reconstruction_scores_the_ceiling(evaluators):
    """With reconstructions equal to the real renders, the VAE row equals the real row: infinite PSNR, no error, the
    same zero-shot accuracies and the same subject retrieval."""
    scenes, _ = toy.heldout_scenes(16, seed=0)
    real = [toy.world.render(s, seed=i)[0] for i, s in enumerate(scenes)]
    refs, labels = toy.subject_references()
    chain = toy.ceiling_chain(evaluators, scenes, real, real, real, refs, labels, refs, {})
    vae_row, real_row = chain["VAE reconstructions"], chain["real renders"]
    assert vae_row["psnr"] == float("inf") and vae_row["mae"] == 0.0
    for k, v in real_row.items():
        assert vae_row[k] == pytest.approx(v), k
    assert chain["UNet samples"]["class"] == pytest.approx(real_row["class"])


def test_a_constant_image_scores_chance(evaluators):
    """One constant image for every scene of a balanced set reads as one answer per class: exactly chance on class,
    color and context."""
    from PIL import Image
    world = toy.world
    scenes = [world.Scene(k, c, "plain", x) for k in world.CLASSES for c in world.COLORS for x in world.CONTEXTS]
    grey = [Image.new("RGB", (64, 64), (128, 128, 128))] * len(scenes)
    acc = toy.attribute_accuracy(evaluators, grey, scenes)
    assert acc["class"] == pytest.approx(1 / len(world.CLASSES))
    assert acc["color"] == pytest.approx(1 / len(world.COLORS))
    assert acc["context"] == pytest.approx(1 / len(world.CONTEXTS))


def test_stages_retrains_only_what_it_names(tmp_path):
    """--stages dino trains the DINO stand-in alone: no other stage checkpoint is written, only the evaluators' file
    is exported (recording the plan that made it), the evaluation CLIP in it is the shipped one, and the SD model
    comes from the shipped file untouched."""
    from safetensors import safe_open
    plan = toy.Plan().scaled(0.002)
    sd_model, eval_clip, dino, seconds = toy.pretrain(plan, tmp_path / "run", ["dino"], export_to=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dino.pt", "plan.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [toy.EVAL_FILE.name]
    assert set(seconds) == {"render", "dino", "total"}
    with safe_open(str(tmp_path / "out" / toy.EVAL_FILE.name), framework="pt") as f:
        assert json.loads(f.metadata()["qdp.toy_plan"])["dino_steps"] == plan.dino_steps
        assert f.metadata()["qdp.toy_stages"] == "dino"
    shipped_clip, shipped_dino = metrics.read_toy_evaluators()
    new_clip, new_dino = metrics.read_toy_evaluators(tmp_path / "out" / toy.EVAL_FILE.name)
    for a, b in zip(shipped_clip.state_dict().values(), new_clip.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(shipped_dino.state_dict().values(),
                                                      new_dino.state_dict().values()))
    shipped = ckpt.load_sd(ckpt.TOY_CKPT)
    for a, b in zip(shipped.unet.state_dict().values(), sd_model.unet.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown stages"):
        toy.pretrain(plan, tmp_path / "run", ["vae", "gan"])


def test_names_keep_their_initial_embeddings(data, tmp_path):
    """The conditioning CLIP trains every token it sees but world.NAMES, whose embeddings stay at initialization, as
    an identifier such as "sks" does: the text tower must learn to carry a word it has no meaning for."""
    torch.manual_seed(2)
    plan = replace(toy.Plan(), clip_steps=3, clip_batch=8)
    named = toy.Data(64, seed=0, named_share=0.5)
    before = toy.CLIPModel(toy.clip_config()).text_model.embeddings.token_embedding.weight.detach().clone()
    clip = toy.train_clip(named, plan, tmp_path)
    after = clip.text_model.embeddings.token_embedding.weight.detach()
    tok = ckpt.load_tokenizer()
    names = [tok(n).input_ids[1] for n in world.NAMES]
    seen = tok("a photo of a dog").input_ids[1:-1]
    decay = (1 - plan.clip_lr * 0.01) ** plan.clip_steps                      # AdamW's decoupled weight decay only
    torch.testing.assert_close(after[names], before[names] * decay, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(after[seen], before[seen] * decay, rtol=1e-3, atol=1e-6)


def test_twins_show_the_same_object_elsewhere(data):
    """The DINO stand-in's second views keep each scene's object and change its background."""
    twins = data.twins()
    assert twins.shape == data.images.shape and twins.dtype == torch.uint8
    assert not torch.equal(twins, data.images)
    for scene, twin in zip(data.scenes, data.twin_scenes):
        assert twin.context != scene.context and replace(twin, context=scene.context) == scene
    assert data.twins() is twins                              # rendered once



def test_set_rejects_unknown_plan_fields():
    """`toy.py --set` overrides plan fields for reduced-scale experiments; a field that does not exist or a value of
    the wrong type is one line, before any work."""
    import subprocess
    import sys
    for bad in ("foo=1", "unet_steps=many"):
        r = subprocess.run([sys.executable, "-m", "toyworld.toy", "--set", bad, "--no_export"], cwd=toy.ASSETS.parents[1],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--set takes FIELD=VALUE pairs of" in r.stderr.splitlines()[-1]
