"""The metrics: CLIP-I, CLIP-T, DINO and zero-shot accuracy, on small random encoders (the identities hold for any)."""
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, ViTModel

import ckpt
import eval as metrics
import toy


@pytest.fixture(scope="module")
def ev():
    torch.manual_seed(0)
    pre = (toy.SIZE, (0.5,) * 3, (0.5,) * 3)
    return metrics.Evaluators(CLIPModel(toy.clip_config()).eval(),
                              ViTModel(toy.dino_config(), add_pooling_layer=False).eval(), ckpt.load_tokenizer(),
                              pre, pre)


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_identical_images_score_one(ev):
    """An image compared with itself has CLIP-I = DINO = 1."""
    a = images(1, 0)
    assert metrics.clip_i(ev, a, a) == pytest.approx(1.0, abs=1e-5)
    assert metrics.dino(ev, a, a) == pytest.approx(1.0, abs=1e-5)


def test_metrics_ignore_image_order(ev):
    """Shuffling the generated or the reference images leaves CLIP-I, DINO and CLIP-T unchanged."""
    gen, ref = images(4, 1), images(3, 2)
    prompts = ["a red mug", "a dog", "a cat in the snow", "a blue vase"]
    for f in (metrics.clip_i, metrics.dino):
        assert f(ev, gen, ref) == pytest.approx(f(ev, gen[::-1], ref[::-1]), abs=1e-6)
    assert metrics.clip_t(ev, gen, prompts) == pytest.approx(metrics.clip_t(ev, gen[::-1], prompts[::-1]), abs=1e-6)


def test_mean_pairwise_cosine_excludes_self_pairs():
    """With exclude_self, the diagonal (always 1) does not count."""
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert metrics.mean_pairwise_cosine(a, a) == pytest.approx(0.5)
    assert metrics.mean_pairwise_cosine(a, a, exclude_self=True) == pytest.approx(0.0)


def test_prepare_resizes_and_crops_like_the_processors():
    """Any image becomes a normalized size x size square, centre-cropped after resizing the short side."""
    x = metrics.prepare([Image.new("RGB", (300, 200), (255, 0, 0))], (224, (0.5,) * 3, (0.5,) * 3))
    assert x.shape == (1, 3, 224, 224)
    assert torch.allclose(x[0, 0], torch.ones(224, 224), atol=1e-4) and torch.allclose(x[0, 1], -torch.ones(224, 224))


def test_zero_shot_picks_the_matching_prompt(ev):
    """zero_shot returns, per image, the index of the candidate with the highest cosine."""
    gen = images(3, 3)
    cands = ["a red mug", "a dog", "a cat"]
    sims = metrics.clip_image_embeds(ev, gen) @ metrics.clip_text_embeds(ev, cands).T
    assert torch.equal(metrics.zero_shot(ev, gen, cands), sims.argmax(-1))
    assert torch.equal(metrics.zero_shot(ev, gen, [cands] * 3), sims.argmax(-1))
