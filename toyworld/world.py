"""The toy world: procedural 64x64 "photos" described by captions, small enough to pretrain a tiny VAE + CLIP + UNet on
two CPU cores, with held-out subjects to personalize. It is to qdp what `shakespeare_char` is to nanoGPT.

A scene is an object of one of 8 classes (6 objects, 2 live: dog and cat) with a color, a pattern and one of 21
backgrounds, sometimes with a property (shiny, wet, cube shaped) or, on a dog or cat, an accessory (a red hat, a chef
outfit, ...). Besides its outline, every class has a part of fixed color that survives a blurry 64-pixel sample (the
mug's white rim and steam, the vase's daisies, the teapot's white lid and black knob and handle, the clock's black
bezel, the dog's black ear and white muzzle, the cat's white chest, the sneaker's sole, the backpack's straps).
Each of the 25 object and 25 live-subject prompt templates of DreamBooth (Ruiz et al., arXiv 2208.12242) has a
counterpart here, so the paper's protocol runs unchanged: `write_dreambooth` writes 30 subjects, as many as the
real dataset has (two-tone bodies with an emblem, which pretraining never draws), in the DreamBooth dataset's layout,
and `eval.read_prompts_and_classes` reads both that folder and the real dataset's prompt file. About 10% of
(class, color, context) triples are held out of pretraining, to test composition. Everything is drawn at 4x with PIL
and downsampled with a box filter; the painters live in paint.py.

    python -m toyworld.world --grid /tmp/grid.png                      # random training scenes with their captions
    python -m toyworld.world --grid /tmp/contexts.png --what contexts  # also: classes, live, heldout, subjects
    python -m toyworld.world --write_dreambooth data/toy_dreambooth    # subject/00.jpg, prompts_and_classes.txt, ...
"""
import argparse
import json
import random
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

import sample
from toyworld import paint
from toyworld.paint import CANVAS, INK, MARKINGS, N_VARIANTS, WHITE  # MARKINGS re-exported: Look.marking is one of them

# --------------------------------------------------------------------------------------------------------------------
# vocabulary: plain English words that the real CLIP tokenizer knows

CLASSES = ("mug", "vase", "backpack", "teapot", "sneaker", "clock", "dog", "cat")
LIVE_CLASSES = ("dog", "cat")  # they take DreamBooth's live-subject prompts (accessories), as dog and cat do there
COLORS = {"red": (215, 25, 30), "orange": (250, 130, 10), "yellow": (250, 215, 20), "green": (40, 160, 50),
          "blue": (30, 80, 215), "purple": (125, 45, 185), "pink": (250, 110, 180), "brown": (120, 70, 35)}
PATTERNS = ("plain", "striped", "dotted", "checkered")
CONTEXT_PHRASES = {  # key -> the words DreamBooth's prompts use for it; "studio" is the neutral backdrop of no prompt
    "studio": "", "jungle": "in the jungle", "snow": "in the snow", "beach": "on the beach",
    "cobblestone": "on a cobblestone street", "pink_fabric": "on top of pink fabric",
    "wooden_floor": "on top of a wooden floor", "city": "with a city in the background",
    "mountain": "with a mountain in the background", "blue_house": "with a blue house in the background",
    "purple_rug": "on top of a purple rug in a forest", "wheat_field": "with a wheat field in the background",
    "autumn_tree": "with a tree and autumn leaves in the background",
    "eiffel_tower": "with the Eiffel Tower in the background", "water": "floating on top of water",
    "milk": "floating in an ocean of milk", "sunflowers": "on top of green grass with sunflowers around it",
    "mirror": "on top of a mirror", "sidewalk": "on top of the sidewalk in a crowded street",
    "dirt_road": "on top of a dirt road", "white_rug": "on top of a white rug"}
CONTEXTS = tuple(CONTEXT_PHRASES)
PROPERTIES = ("shiny", "wet", "cube shaped")
ACCESSORY_PHRASES = {
    "red hat": "wearing a red hat", "santa hat": "wearing a santa hat", "rainbow scarf": "wearing a rainbow scarf",
    "top hat and monocle": "wearing a black top hat and a monocle", "chef outfit": "in a chef outfit",
    "firefighter outfit": "in a firefighter outfit", "police outfit": "in a police outfit",
    "pink glasses": "wearing pink glasses", "yellow shirt": "wearing a yellow shirt",
    "purple wizard outfit": "in a purple wizard outfit"}
ACCESSORIES = tuple(ACCESSORY_PHRASES)
REFLECTIVE = ("water", "milk", "mirror")  # the object's reflection is drawn below it, outside its box

# DreamBooth's prompt templates, rebuilt from the phrases above ({0} the unique token, {1} the class noun)
RECOLOR_PROPS = ("red", "purple")
_PROPERTY_TEMPLATES = [f"a {w} {{0}} {{1}}" for w in RECOLOR_PROPS + PROPERTIES]
OBJECT_TEMPLATES = [f"a {{0}} {{1}} {CONTEXT_PHRASES[c]}" for c in CONTEXTS[1:]] + _PROPERTY_TEMPLATES
LIVE_TEMPLATES = ([f"a {{0}} {{1}} {CONTEXT_PHRASES[c]}" for c in CONTEXTS[1:11]]
                  + [f"a {{0}} {{1}} {ACCESSORY_PHRASES[a]}" for a in ACCESSORIES] + _PROPERTY_TEMPLATES)


def is_live(cls):
    """Live subjects (dogs, cats) take DreamBooth's live prompt list, in the real dataset and here."""
    return cls in LIVE_CLASSES


# --------------------------------------------------------------------------------------------------------------------
# scenes, the held-out split and captions

@dataclass(frozen=True)
class Scene:
    cls: str
    color: str | None  # None for a named individual, whose look its name fixes
    pattern: str
    context: str
    prop: str | None = None  # one of PROPERTIES
    accessory: str | None = None  # one of ACCESSORIES, live classes only
    name: str | None = None  # one of NAMES: a named individual ("a photo of meng dog")


@dataclass(frozen=True)
class Look:
    """How an object's body is painted. Scenes paint one color (top == bottom) and no marking; subjects are two-tone
    and carry a marking, which is what keeps them out of pretraining."""
    top: tuple
    bottom: tuple
    pattern: str = "plain"
    marking: str | None = None  # one of MARKINGS
    mark_color: tuple = WHITE
    collar: tuple | None = None  # a collar with a gold tag, live classes only


def scene_look(scene):
    return INDIVIDUALS[scene.name].look if scene.name else Look(COLORS[scene.color], COLORS[scene.color], scene.pattern)


def is_heldout(cls, color, context):
    """About 1 in 10 (class, color, context) triples, fixed by a hash, never appear in pretraining."""
    return zlib.crc32(f"{cls}|{color}|{context}".encode()) % 10 == 0


TRIPLES = [(k, c, x) for k in CLASSES for c in COLORS for x in CONTEXTS]
HELDOUT_TRIPLES = [t for t in TRIPLES if is_heldout(*t)]
TRAIN_TRIPLES = [t for t in TRIPLES if not is_heldout(*t)]


def sample_scene(rng, split="train", named_share=0.0):
    """A random scene whose (class, color, context) lies in `split`, or, for `named_share` of the training scenes
    (toy.py pretrains with NAMED_SHARE), a named individual in a random context; rng is a random.Random."""
    if split == "train" and named_share and rng.random() < named_share:
        who = INDIVIDUALS[rng.choice(NAMES)]
        accessory = rng.choice(ACCESSORIES) if is_live(who.cls) and rng.random() < 0.3 else None
        return Scene(who.cls, None, "plain", rng.choice(CONTEXTS), None, accessory, who.name)
    cls, color, context = rng.choice(TRAIN_TRIPLES if split == "train" else HELDOUT_TRIPLES)
    pattern = rng.choice(PATTERNS[1:]) if rng.random() < 0.6 else "plain"
    prop = rng.choice(PROPERTIES) if rng.random() < 0.2 else None
    accessory = rng.choice(ACCESSORIES) if is_live(cls) and rng.random() < 0.5 else None
    return Scene(cls, color, pattern, context, prop, accessory)


def caption(scene, rng=None):
    """The canonical caption ("a shiny red striped mug on the beach") or, given an rng, a pretraining caption that
    may drop the color, pattern, property, accessory or context and may start with "a photo of"."""
    keep = (lambda p: True) if rng is None else (lambda p: rng.random() < p)
    words = [w for w, p in ((scene.prop, 0.85), (scene.color, 0.8), (scene.pattern, 0.7))
             if w and w != "plain" and keep(p)] + [scene.cls]
    if scene.name:                         # where DreamBooth's prompts put the identifier: "a meng dog in the snow"
        words = [scene.name, scene.cls]
    text = ("an " if words[0][0] in "aeiou" and not scene.name else "a ") + " ".join(words)
    if scene.accessory and keep(0.85):
        text += " " + ACCESSORY_PHRASES[scene.accessory]
    if scene.context != "studio" and keep(0.75):
        text += " " + CONTEXT_PHRASES[scene.context]
    if rng is None or rng.random() >= 0.5:
        return text
    return "a photo of " + (text[2:] if scene.name else text)    # "a photo of meng dog", as "a photo of sks dog"


# --------------------------------------------------------------------------------------------------------------------
# composing a picture: a background and a sprite in a random pose

def _compose(cls, look, context, prop, accessory, seed, size):
    """Draw `cls` in `look` on a background of `context` in a random pose; returns (image, box) at `size`."""
    assert CANVAS % size == 0, f"size must divide {CANVAS}"
    rng = random.Random(seed)
    canvas = paint.background(context, rng.randrange(N_VARIANTS)).copy()
    sprite = paint.sprite(cls, look, prop, accessory, int(CANVAS * rng.uniform(0.6, 0.85)), rng)
    if max(sprite.size) > 0.86 * CANVAS:  # a tall hat or flowers: shrink the whole figure to fit the canvas
        k = 0.86 * CANVAS / max(sprite.size)
        sprite = sprite.resize((round(k * sprite.width), round(k * sprite.height)), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sprite = sprite.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, expand=True)
    sprite = sprite.crop(sprite.getchannel("A").getbbox())
    w, h = sprite.size
    margin = 8
    x = margin + round(rng.random() * (CANVAS - 2 * margin - w))
    lo, hi = (0.5, 0.72) if context in REFLECTIVE else (0.62, 1.0)  # where the bottom of the object may rest
    lo, hi = max(h + margin, int(lo * CANVAS)), min(CANVAS - margin, max(h + margin, int(hi * CANVAS)))
    y = round(lo + rng.random() * (hi - lo)) - h
    if prop == "wet":  # a puddle sheen at the object's base, inside its box
        ImageDraw.Draw(canvas, "RGBA").ellipse((x, y + 0.88 * h, x + w - 1, y + h - 1), fill=(140, 175, 220, 170))
    if context in REFLECTIVE:
        ref = sprite.transpose(Image.Transpose.FLIP_TOP_BOTTOM).crop((0, 0, w, min(h, CANVAS - y - h)))
        ref.putalpha(ref.getchannel("A").point(lambda v: v * 0.4))
        canvas.alpha_composite(ref, (x, y + h))
    canvas.alpha_composite(sprite, (x, y))
    f = CANVAS // size
    img = canvas.convert("RGB")
    return (img.reduce(f) if f > 1 else img), (x // f, y // f, -(-(x + w) // f), -(-(y + h) // f))


def render(scene, seed, size=64):
    """(PIL RGB image size x size, object box (x0, y0, x1, y1) in pixels, x1 and y1 exclusive); one seed, one pose."""
    return _compose(scene.cls, scene_look(scene), scene.context, scene.prop, scene.accessory, seed, size)


def render_background(context, seed, size=64):
    """The background that `render` puts behind the object for this seed."""
    img = paint.background(context, random.Random(seed).randrange(N_VARIANTS)).convert("RGB")
    return img.reduce(CANVAS // size) if size < CANVAS else img


# --------------------------------------------------------------------------------------------------------------------
# held-out subjects, in DreamBooth's dataset layout

@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    look: Look
    about: str  # what makes it itself, in words


def _subject(name, top, bottom, marking, mark_color, collar=None, about=""):
    return Subject(name, name.split("_")[0], Look(top, bottom, marking=marking, mark_color=mark_color, collar=collar),
                   about)


# colors of the subjects' bodies, emblems and collars (the scenes' 8 COLORS paint single-color bodies only)
NAVY, CREAM, TEAL, CHARCOAL, MINT, TAN, GREY, GOLD = ((20, 30, 80), (250, 250, 245), (20, 150, 150), (60, 60, 70),
                                                     (120, 230, 120), (220, 170, 100), (140, 140, 150), (255, 200, 0))
RED, BLUE, GREEN, YELLOW, ORANGE, PINK, PURPLE, BROWN, CYAN = (
    (215, 20, 40), (30, 80, 215), (40, 150, 70), (250, 215, 40), (250, 140, 20), (250, 120, 175), (125, 45, 185),
    (120, 70, 35), (60, 210, 230))

# 30 subjects, as many as the DreamBooth dataset has: 9 live (dogs and cats) and 21 objects. Each has a two-tone body
# and an emblem (live ones also a collar, or white paws, or an eye patch), which pretraining never draws; within a
# class no two share their body colors or their emblem. The first ten are the original toy subjects.
SUBJECTS = {s.name: s for s in (
    _subject("mug_star", BLUE, CREAM, "star", GOLD, about="blue top, cream bottom, a gold star"),
    _subject("vase_heart", PINK, TEAL, "heart", RED, about="pink top, teal bottom, a red heart on the belly"),
    _subject("backpack_bolt", CHARCOAL, ORANGE, "bolt", YELLOW,
             about="charcoal top, orange bottom, a yellow lightning bolt"),
    _subject("teapot_sun", (245, 240, 225), (200, 35, 35), "sun", GOLD, about="cream top, red bottom, a yellow sun"),
    _subject("sneaker_diamond", PURPLE, MINT, "diamond", WHITE, about="purple top, mint bottom, a white diamond"),
    _subject("clock_moon", NAVY, GOLD, "moon", NAVY, about="navy top, yellow bottom, a navy crescent moon on the face"),
    _subject("dog_patch", (250, 250, 250), (150, 90, 40), "patch", INK, (220, 20, 20),
             "white top, brown bottom, a black eye patch, a red collar with a gold tag"),
    _subject("dog_star", (30, 30, 35), TAN, "star", (255, 220, 0), (40, 100, 230),
             "black top, tan bottom, a yellow star on the flank, a blue collar"),
    _subject("cat_socks", GREY, (240, 140, 40), "socks", WHITE, (40, 170, 60),
             "grey top, orange bottom, white paws, a green collar"),
    _subject("cat_heart", (35, 35, 40), (250, 250, 250), "heart", (255, 110, 180),
             about="black top, white bottom, a pink heart on the chest"),
    _subject("mug_bolt", RED, CREAM, "bolt", INK, about="red top, cream bottom, a black lightning bolt"),
    _subject("mug_ring", GREEN, YELLOW, "ring", WHITE, about="green top, yellow bottom, a white ring"),
    _subject("mug_diamond", CHARCOAL, PINK, "diamond", CYAN, about="charcoal top, pink bottom, a cyan diamond"),
    _subject("vase_sun", NAVY, ORANGE, "sun", YELLOW, about="navy top, orange bottom, a yellow sun"),
    _subject("vase_cross", CREAM, PURPLE, "cross", RED, about="cream top, purple bottom, a red cross"),
    _subject("vase_star", YELLOW, GREEN, "star", BLUE, about="yellow top, green bottom, a blue star"),
    _subject("backpack_heart", RED, NAVY, "heart", WHITE, about="red top, navy bottom, a white heart"),
    _subject("backpack_star", TEAL, PINK, "star", YELLOW, about="teal top, pink bottom, a yellow star"),
    _subject("backpack_ring", YELLOW, BROWN, "ring", INK, about="yellow top, brown bottom, a black ring"),
    _subject("teapot_diamond", GREEN, CREAM, "diamond", PINK, about="green top, cream bottom, a pink diamond"),
    _subject("teapot_cross", BLUE, YELLOW, "cross", WHITE, about="blue top, yellow bottom, a white cross"),
    _subject("sneaker_star", RED, CHARCOAL, "star", YELLOW, about="red top, charcoal bottom, a yellow star"),
    _subject("sneaker_bolt", CYAN, ORANGE, "bolt", INK, about="cyan top, orange bottom, a black lightning bolt"),
    _subject("clock_heart", GREEN, PINK, "heart", RED, about="green top, pink bottom, a red heart on the face"),
    _subject("clock_star", ORANGE, PURPLE, "star", BLUE, about="orange top, purple bottom, a blue star on the face"),
    _subject("dog_heart", BROWN, CREAM, "heart", RED, GOLD,
             "brown top, cream bottom, a red heart on the flank, a gold collar"),
    _subject("dog_socks", ORANGE, (30, 30, 35), "socks", WHITE, PURPLE,
             "orange top, black bottom, white paws, a purple collar"),
    _subject("dog_bolt", GREY, BLUE, "bolt", YELLOW, GREEN,
             "grey top, blue bottom, a yellow lightning bolt on the flank, a green collar"),
    _subject("cat_star", CREAM, GREY, "star", ORANGE, RED, "cream top, grey bottom, an orange star, a red collar"),
    _subject("cat_patch", ORANGE, CREAM, "patch", INK, BLUE,
             "orange top, cream bottom, a black eye patch, a blue collar"),
)}
# named individuals: web captions name particular dogs, mugs and people, and a real text encoder carries any such
# name through to the image; DreamBooth's rare identifier ("sks") relies on that. Without them the toy text encoder
# learns to ignore every word outside the world's vocabulary, and "a photo of sks dog" encodes as "a photo of a dog"
# (cosine 0.995), so the prior-preservation loss cancels the subject loss. So NAMED_SHARE of the training scenes are
# one of 48 individuals, six per class, each called by a rare word of the CLIP vocabulary and drawn in a look of its
# own (two-tone with an emblem, as the subjects, but never one of theirs). toy.py keeps these words' embeddings at
# their random initialization, as "sks" is, so the text encoder learns to read a name it has no meaning for.
NAMES = ("woop", "rizio", "eron", "towie", "pano", "orin", "maddy", "wadi", "lizzy", "feng", "ongo", "chery",
         "bayan", "musa", "mery", "korn", "elian", "toral", "kona", "veit", "rolf", "miko", "kawa", "boba",
         "kala", "arra", "robby", "argos", "cowan", "breen", "shai", "maja", "karo", "hadi", "sabi", "rosen",
         "maar", "igor", "simba", "zada", "anak", "hoek", "jaye", "fonda", "chara", "arca", "jace", "griff")
NAMED_SHARE = 0.15


def _individuals(seed=2024):
    """{name: Subject}: NAMES in turn take the 8 classes; each look is drawn from the subjects' palette, and a
    look (class, body colors, emblem) that one of the 30 SUBJECTS has is drawn again."""
    rng = random.Random(seed)
    palette = [NAVY, CREAM, TEAL, CHARCOAL, MINT, TAN, GREY, GOLD, RED, BLUE, GREEN, YELLOW, ORANGE, PINK, PURPLE,
               BROWN, CYAN, WHITE, INK]
    taken = {(s.cls, s.look.top, s.look.bottom, s.look.marking) for s in SUBJECTS.values()}
    out = {}
    for i, name in enumerate(NAMES):
        cls = CLASSES[i % len(CLASSES)]
        marks = [m for m in MARKINGS if (is_live(cls) or m not in ("patch", "socks"))   # eyes and paws: live only
                 and (cls == "clock" or m != "moon")]                                   # the moon needs a face
        while True:
            top, bottom, mark_color = rng.sample(palette, 3)
            look = Look(top, bottom, marking=rng.choice(marks), mark_color=mark_color,
                        collar=rng.choice(palette) if is_live(cls) and rng.random() < 0.5 else None)
            if (cls, top, bottom, look.marking) not in taken:
                break
        taken.add((cls, top, bottom, look.marking))
        out[name] = Subject(name, cls, look, "")
    return out


INDIVIDUALS = _individuals()
REFERENCE_CONTEXTS = ("studio", "wooden_floor", "white_rug", "studio", "pink_fabric", "cobblestone")


def references(name):
    """(context, seed) of each reference picture of a subject: 4 to 6 of them, in varied poses and home-like places."""
    i = list(SUBJECTS).index(name)
    return [(REFERENCE_CONTEXTS[(i + k) % len(REFERENCE_CONTEXTS)], 1000 * i + k) for k in range(4 + i % 3)]


def render_subject(name, context="studio", seed=0, prop=None, accessory=None, size=64):
    """Ground truth for "a sks <class> <context/prop/accessory>"; a prop "red" or "purple" recolors the whole body."""
    s = SUBJECTS[name]
    assert accessory is None or is_live(s.cls), f"{name} is not a live subject: it takes no accessory"
    look = s.look
    if prop in COLORS:
        look, prop = replace(look, top=COLORS[prop], bottom=COLORS[prop]), None
    return _compose(s.cls, look, context, prop, accessory, seed, size)


def template_counterpart(template):
    """What a DreamBooth template asks for, in this world: 'a {0} {1} in the snow' -> {context: snow, prop: None,
    accessory: None}; 'a cube shaped {0} {1}' -> {context: studio, prop: 'cube shaped', ...}."""
    head, _, tail = template.partition("{0} {1}")
    prop, tail = head[2:].strip() or None, tail.strip()
    assert prop is None or prop in RECOLOR_PROPS + PROPERTIES, f"no counterpart for the property in {template!r}"
    contexts = {v: k for k, v in CONTEXT_PHRASES.items()}
    accessories = {v: k for k, v in ACCESSORY_PHRASES.items()}
    assert tail in contexts or tail in accessories, f"no counterpart for {tail!r} in {template!r}"
    return dict(context=contexts.get(tail, "studio"), prop=prop, accessory=accessories.get(tail))


def _prompt_file(classes):
    """prompts_and_classes.txt as the real dataset writes it: the Classes table, then the two prompt lists."""
    lines = ["Classes", "", "subject_name,class"] + [f"{n},{c}" for n, c in classes.items()]
    lines += ["", "Prompts", ""]
    for title, templates in (("Object Prompts", OBJECT_TEMPLATES), ("Live Subject Prompts", LIVE_TEMPLATES)):
        lines += [title, "", "prompt_list = ["]
        lines += [f"'{t}'.format(unique_token, class_token)" + ("," if i < len(templates) - 1 else "")
                  for i, t in enumerate(templates)]
        lines += ["]", ""]
    return "\n".join(lines)


def write_dreambooth(root, size=64):
    """root/<subject>/00.jpg ... (4 to 6 references each, JPEG quality 95), root/prompts_and_classes.txt,
    root/boxes.json ({subject: {file: [x0, y0, x1, y1]}}). Returns root as a Path."""
    root = Path(root)
    boxes = {}
    for s in SUBJECTS.values():
        (root / s.name).mkdir(parents=True, exist_ok=True)
        boxes[s.name] = {}
        for k, (context, seed) in enumerate(references(s.name)):
            img, box = render_subject(s.name, context, seed, size=size)
            img.save(root / s.name / f"{k:02d}.jpg", quality=95, subsampling=0)  # 4:4:4 keeps small emblems sharp
            boxes[s.name][f"{k:02d}.jpg"] = list(box)
    (root / "prompts_and_classes.txt").write_text(_prompt_file({s.name: s.cls for s in SUBJECTS.values()}))
    (root / "boxes.json").write_text(json.dumps(boxes))
    return root


def grid_cells(what, seed=0, n=48):
    """(image, label) pairs for a contact sheet of `what`: random train or held-out scenes, every context, every class
    in every color, every accessory and property, every named individual, or two reference pictures of each subject."""
    rng = random.Random(seed)
    if what in ("train", "heldout"):
        scenes = [sample_scene(rng, what) for _ in range(n)]
        return [(render(s, seed + i)[0], caption(s, rng if what == "train" else None)) for i, s in enumerate(scenes)]
    if what == "contexts":
        return [(render(Scene(rng.choice(CLASSES), rng.choice(list(COLORS)), "plain", x), seed + k)[0], x)
                for k in range(2) for x in CONTEXTS]
    if what == "classes":
        return [(render(Scene(k, c, p, "studio"), seed + i)[0], f"{c} {p} {k}")
                for i, (k, c, p) in enumerate((k, c, PATTERNS[j % 4]) for k in CLASSES for j, c in enumerate(COLORS))]
    if what == "live":
        looks = [(None, a) for a in ACCESSORIES] + [(p, None) for p in PROPERTIES]
        return [(render(Scene(k, rng.choice(list(COLORS)), "plain", "studio", *x), seed + i)[0], x[0] or x[1])
                for k in LIVE_CLASSES for i, x in enumerate(looks)]
    if what == "named":                          # every named individual, as pretraining captions it
        scenes = [Scene(w.cls, None, "plain", rng.choice(CONTEXTS), name=w.name) for w in INDIVIDUALS.values()]
        return [(render(s, seed + i)[0], caption(s)) for i, s in enumerate(scenes)]
    if what == "subjects":                       # the first two references of every subject
        return [(render_subject(s, context, seed)[0], f"{s} {context}")
                for s in SUBJECTS for context, seed in references(s)[:2]]
    raise ValueError(what)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grid", type=str, default=None, help="write a labelled contact sheet to this PNG")
    parser.add_argument("--what", type=str, default="train",
                        choices=("train", "heldout", "contexts", "classes", "live", "named", "subjects"),
                        help="what the grid shows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the grid's scenes")
    parser.add_argument("--write_dreambooth", type=str, default=None, help="write the toy subjects to this folder")
    parser.add_argument("--size", type=int, default=64, choices=(64, 128, 256),
                        help="side in pixels of the images --write_dreambooth writes")
    args = parser.parse_args()
    if args.grid is None and args.write_dreambooth is None:
        parser.error("nothing to do: give --grid PATH and/or --write_dreambooth DIR")
    if args.grid:
        cells = grid_cells(args.what, args.seed)
        sample.labelled_grid(cells, cols=10 if args.what == "subjects" else 8).save(args.grid)
        print(f"wrote {len(cells)} images to {args.grid}")
    if args.write_dreambooth:
        root = write_dreambooth(args.write_dreambooth, args.size)
        print(f"wrote {len(SUBJECTS)} subjects to {root}")
