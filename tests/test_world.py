"""The toy world: deterministic renders, captions that match the pixels, a clean held-out split, subjects that
pretraining never draws, and DreamBooth's dataset layout and prompt templates, read by one parser in both worlds."""
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import eval as metrics
from toyworld import world
from conftest import SHARED

REAL_PROMPTS = SHARED / "dreambooth" / "dataset" / "prompts_and_classes.txt"


def pixels(img):
    return np.asarray(img, dtype=np.float64)


def nearest_color(rgb):
    return min(world.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(world.COLORS[c], rgb)))


def changed(a, b):
    """How many pixels differ clearly between two pictures."""
    return int((np.abs(pixels(a) - pixels(b)).sum(-1) > 40).sum())


def small(img):
    """An 8x8 thumbnail as a feature vector: the layout and dominant colors of a picture."""
    return pixels(img.resize((8, 8), 4)).ravel() / 255  # 4 = box filter


def test_render_is_deterministic():
    """One scene and one seed give the same pixels and box every time; other seeds give other pictures."""
    rng = random.Random(0)
    for _ in range(20):
        scene = world.sample_scene(rng)
        (a, box_a), (b, box_b), (c, _) = world.render(scene, 7), world.render(scene, 7), world.render(scene, 8)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert box_a == box_b and np.array_equal(pixels(a), pixels(b))
        assert not np.array_equal(pixels(a), pixels(c))


def test_box_holds_the_object():
    """Outside its box a picture is exactly its empty background (reflections aside); the box lies in the frame and
    its longer side is 40% to 95% of the image side."""
    rng = random.Random(1)
    for i in range(200):
        scene = world.sample_scene(rng)
        img, (x0, y0, x1, y1) = world.render(scene, i)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert 0.4 <= max(x1 - x0, y1 - y0) / 64 <= 0.95
        if scene.context in world.REFLECTIVE:
            continue
        outside = np.ones((64, 64), bool)
        outside[y0:y1, x0:x1] = False
        bg = world.render_background(scene.context, i)
        assert np.array_equal(pixels(img)[outside], pixels(bg)[outside])
        assert np.abs(pixels(img) - pixels(bg))[~outside].sum() > 0


def test_sizes_agree():
    """A 128x128 render is the 64x64 picture at twice the resolution, its box scaled by two (to a pixel)."""
    scene = world.Scene("teapot", "green", "dotted", "beach", "shiny")
    (a, box_a), (b, box_b) = world.render(scene, 3), world.render(scene, 3, size=128)
    assert b.size == (128, 128) and all(abs(2 * u - v) <= 1 for u, v in zip(box_a, box_b))
    assert np.abs(pixels(b.reduce(2)) - pixels(a)).max() <= 1


@pytest.mark.parametrize("cls", world.CLASSES)
def test_object_color_matches_caption(cls):
    """For a plain object with no property, the median color of its pixels is nearest to its named color."""
    for seed, color in enumerate(world.COLORS):
        scene = world.Scene(cls, color, "plain", "studio")
        img, (x0, y0, x1, y1) = world.render(scene, seed)
        a = pixels(img)[y0:y1, x0:x1]
        b = pixels(world.render_background("studio", seed))[y0:y1, x0:x1]
        drawn = a[np.abs(a - b).sum(-1) > 60]
        assert len(drawn) > 100
        assert nearest_color(np.median(drawn, 0)) == color, (cls, color)


def test_patterns_and_properties_change_the_picture():
    """Every pattern, property and accessory draws something different from the plain object in the same pose."""
    base = world.render(world.Scene("dog", "blue", "plain", "studio"), 5)[0]
    variants = [world.Scene("dog", "blue", p, "studio") for p in world.PATTERNS[1:]]
    variants += [world.Scene("dog", "blue", "plain", "studio", prop=p) for p in world.PROPERTIES]
    variants += [world.Scene("dog", "blue", "plain", "studio", accessory=a) for a in world.ACCESSORIES]
    looks = [world.render(v, 5)[0] for v in variants]
    for v, img in zip(variants, looks):
        assert changed(img, base) >= 10, v
    for i in range(len(looks)):
        for j in range(i):
            assert changed(looks[i], looks[j]) >= 10, (variants[i], variants[j])


def test_contexts_are_distinguishable():
    """Backgrounds of one context are nearer each other than any other context's (leave-one-out nearest centroid on
    8x8 thumbnails), and the same classifier still names the context of most whole pictures, objects included,
    from the thumbnail cells that the object's box leaves free."""
    feats = {c: np.stack([small(world.render_background(c, s)) for s in range(12)]) for c in world.CONTEXTS}
    for c, f in feats.items():
        for i in range(len(f)):
            own = np.delete(f, i, 0).mean(0)
            d_own = ((f[i] - own) ** 2).sum()
            d_other = min(((f[i] - g.mean(0)) ** 2).sum() for o, g in feats.items() if o != c)
            assert d_own < d_other, (c, i)
    centroids = {c: f.mean(0) for c, f in feats.items()}
    rng, hits, n = random.Random(2), 0, 0
    for c in world.CONTEXTS:
        for seed in range(100, 110):
            scene = world.Scene(rng.choice(world.CLASSES), rng.choice(list(world.COLORS)), "plain", c)
            img, (x0, y0, x1, y1) = world.render(scene, seed)
            free = np.ones((8, 8, 3), bool)
            free[y0 // 8:-(-y1 // 8), x0 // 8:-(-x1 // 8)] = False
            f, free = small(img), free.ravel()
            hits += min(centroids, key=lambda o: ((centroids[o] - f)[free] ** 2).sum()) == c
            n += 1
    assert hits / n > 0.9


def test_captions():
    """The canonical caption names every attribute in DreamBooth's word order; pretraining captions always name the
    class and use only words of the canonical caption (plus "a photo of")."""
    scene = world.Scene("dog", "red", "striped", "snow", "shiny", "santa hat")
    assert world.caption(scene) == "a shiny red striped dog wearing a santa hat in the snow"
    assert world.caption(world.Scene("mug", "orange", "plain", "studio")) == "an orange mug"
    assert world.caption(world.Scene("vase", "blue", "dotted", "mirror")) == "a blue dotted vase on top of a mirror"
    rng = random.Random(3)
    seen = Counter()
    for _ in range(500):
        scene = world.sample_scene(rng)
        full, text = set(world.caption(scene).split()), world.caption(scene, rng)
        assert scene.cls in text.split() and set(text.split()) <= full | {"a", "an", "photo", "of"}
        seen[text == world.caption(scene)] += 1
        seen["photo"] += text.startswith("a photo of ")
    assert seen[True] > 50 and seen[False] > 50 and 150 < seen["photo"] < 350


def test_heldout_split_is_clean():
    """About a tenth of the (class, color, context) triples are held out; sampled training scenes never hold one and
    still cover every class, color, context, pattern, property and accessory; the held-out sampler draws only them."""
    assert 0.05 < len(world.HELDOUT_TRIPLES) / len(world.TRIPLES) < 0.15
    assert {t[0] for t in world.HELDOUT_TRIPLES} == set(world.CLASSES)
    rng = random.Random(4)
    train = [world.sample_scene(rng) for _ in range(10_000)]
    assert not any(world.is_heldout(s.cls, s.color, s.context) for s in train)
    assert {s.cls for s in train} == set(world.CLASSES) and {s.color for s in train} == set(world.COLORS)
    assert {s.context for s in train} == set(world.CONTEXTS) and {s.pattern for s in train} == set(world.PATTERNS)
    assert {s.prop for s in train} == {None, *world.PROPERTIES}
    assert {s.accessory for s in train} == {None, *world.ACCESSORIES}
    assert all(s.accessory is None for s in train if not world.is_live(s.cls))
    heldout = [world.sample_scene(rng, "heldout") for _ in range(1000)]
    assert all(world.is_heldout(s.cls, s.color, s.context) for s in heldout)


def test_subjects_never_appear_in_pretraining():
    """Pretraining paints one color and no marking or collar; every subject is two-tone with a marking, so no
    sampled scene can look like one. Subjects mix object and live classes."""
    rng = random.Random(5)
    looks = {world.scene_look(world.sample_scene(rng)) for _ in range(10_000)}
    assert all(lk.top == lk.bottom and lk.marking is None and lk.collar is None for lk in looks)
    assert len(world.SUBJECTS) >= 8
    classes = {s.cls for s in world.SUBJECTS.values()}
    assert classes <= set(world.CLASSES) and classes & set(world.LIVE_CLASSES) and classes - set(world.LIVE_CLASSES)
    for s in world.SUBJECTS.values():
        assert s.look.top != s.look.bottom and s.look.marking in world.MARKINGS
        assert s.look not in looks


def test_named_individuals(tmp_path):
    """48 names, each one token of SD's tokenizer and none the identifier DreamBooth uses; each individual is two-tone
    with an emblem its class can carry and unlike every subject (class, body colors and emblem); named scenes come
    at the share asked for, only in training, and caption the name where DreamBooth's prompts put "sks"."""
    import ckpt
    tok = ckpt.load_tokenizer()
    assert len(set(world.NAMES)) == 48 and "sks" not in world.NAMES
    assert all(len(tok(n).input_ids) == 3 for n in world.NAMES)                   # bos, the name, eos
    subjects = {(s.cls, s.look.top, s.look.bottom, s.look.marking) for s in world.SUBJECTS.values()}
    for who in world.INDIVIDUALS.values():
        look = who.look
        assert look.top != look.bottom and look.marking in world.MARKINGS
        assert (who.cls, look.top, look.bottom, look.marking) not in subjects
        assert world.is_live(who.cls) or look.marking not in ("patch", "socks")
    rng = random.Random(0)
    scenes = [world.sample_scene(rng, "train", 0.15) for _ in range(4000)]
    named = [sc for sc in scenes if sc.name]
    assert 0.12 < len(named) / len(scenes) < 0.18
    assert not any(world.sample_scene(rng, "heldout", 0.15).name for _ in range(500))
    assert not any(world.sample_scene(rng, "train").name for _ in range(500))      # off unless asked for
    captions = [world.caption(sc, random.Random(i)) for i, sc in enumerate(named[:200])]
    for sc, c in zip(named, captions):
        assert c.startswith((f"a {sc.name} {sc.cls}", f"a photo of {sc.name} {sc.cls}"))
    img, _ = world.render(named[0], 3)
    assert img.size == (64, 64)


def test_write_dreambooth_and_read_it_back(tmp_path):
    """write_dreambooth writes DreamBooth's layout (subject/00.jpg..., 4 to 6 references, prompts_and_classes.txt)
    and a box per reference; read_prompts_and_classes reads back the subjects and 25 + 25 templates."""
    root = world.write_dreambooth(tmp_path / "db")
    classes, object_prompts, live_prompts = metrics.read_prompts_and_classes(root / "prompts_and_classes.txt")
    assert classes == {s.name: s.cls for s in world.SUBJECTS.values()}
    assert object_prompts == world.OBJECT_TEMPLATES and live_prompts == world.LIVE_TEMPLATES
    assert len(object_prompts) == len(live_prompts) == 25
    boxes = json.loads((root / "boxes.json").read_text())
    for name in classes:
        files = sorted(p.name for p in (root / name).iterdir())
        assert 4 <= len(files) <= 6 and files == [f"{k:02d}.jpg" for k in range(len(files))]
        assert sorted(boxes[name]) == files
        img = Image.open(root / name / files[0])
        assert img.size == (64, 64) and img.format == "JPEG"


def test_reads_the_real_prompt_file():
    """The same parser reads the real DreamBooth file: 30 subjects, 25 object and 25 live templates, which are
    exactly the toy world's, so one evaluation protocol runs in both worlds."""
    if not REAL_PROMPTS.exists():
        pytest.skip(f"{REAL_PROMPTS} is absent")
    classes, object_prompts, live_prompts = metrics.read_prompts_and_classes(REAL_PROMPTS)
    assert len(classes) == 30 and classes["dog2"] == "dog" and classes["red_cartoon"] == "cartoon"
    assert len(object_prompts) == len(live_prompts) == 25
    assert object_prompts == world.OBJECT_TEMPLATES and live_prompts == world.LIVE_TEMPLATES
    assert object_prompts[1].format("sks", "teapot") == "a sks teapot in the snow"
    live = {n for n, c in classes.items() if world.is_live(c)}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


@pytest.mark.parametrize("live", [False, True])
def test_every_template_has_a_counterpart(live):
    """Each DreamBooth template maps to a context, property or accessory of the world, and render_subject draws it:
    the picture differs from the subject's plain studio picture in the same pose."""
    names = [n for n, s in world.SUBJECTS.items() if world.is_live(s.cls) == live]
    templates = world.LIVE_TEMPLATES if live else world.OBJECT_TEMPLATES
    for i, t in enumerate(templates):
        name = names[i % len(names)]
        target = world.template_counterpart(t)
        img, box = world.render_subject(name, seed=i, **target)
        plain, _ = world.render_subject(name, seed=i)
        assert changed(img, plain) >= 10, (t, target)
    assert world.template_counterpart("a {0} {1} wearing a red hat") == dict(context="studio", prop=None,
                                                                             accessory="red hat")
    assert world.template_counterpart("a cube shaped {0} {1}")["prop"] == "cube shaped"
