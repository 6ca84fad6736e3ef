"""How the toy world is drawn: the PIL painters behind `world.render`. One function per background context, one
drawer per class (its silhouette in KEY, plus anchors), the body's paint and patterns, the subjects' markings, the live
classes' accessories and the properties (shiny, wet, cube shaped), all on a CANVAS x CANVAS image with a seeded
random.Random. It is a separate file so that world.py stays readable in one sitting: world.py says what the world
contains (vocabulary, scenes, captions, the held-out split, subjects), paint.py how it is drawn. It knows nothing of
world.py; world.py composes `background` and `sprite` into a picture.

    python -m toyworld.world --grid /tmp/contexts.png --what contexts   # every background; also: classes, live, ...
"""
import functools
import math
import random
import sys

import numpy as np
from PIL import Image, ImageChops, ImageDraw

CANVAS = 256  # drawing resolution; output sizes 64, 128 and 256 are box-filtered from it
N_VARIANTS = 8  # random backgrounds drawn (and cached) per context
KEY = (3, 254, 5)  # bodies are drawn in this color first, then filled with their colors and pattern
KEY32 = int.from_bytes(bytes(KEY + (255,)), sys.byteorder)  # KEY as one RGBA pixel read as a uint32
INK = (35, 30, 30)
WHITE = (245, 245, 240)


# --------------------------------------------------------------------------------------------------------------------
# backgrounds: one function per context, drawing on a CANVAS x CANVAS RGB image with a seeded random.Random

def _mix(c0, c1, t):
    return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))


def _grad(d, y0, y1, c0, c1):
    for y in range(int(y0), int(y1)):
        d.line([(0, y), (CANVAS, y)], fill=_mix(c0, c1, (y - y0) / max(1, y1 - y0)))


def _star(cx, cy, r, inner=0.45):
    return [(cx + r * (1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
             cy + r * (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]


def _bg_studio(d, r):
    h = r.randint(140, 170)
    _grad(d, 0, h, (232, 232, 236), (200, 200, 206))
    _grad(d, h, CANVAS, (182, 182, 188), (160, 160, 166))


def _bg_jungle(d, r):
    _grad(d, 0, CANVAS, (25, 85, 35), (15, 50, 20))
    for _ in range(70):
        x, y, s, a = r.uniform(-20, 270), r.uniform(-20, 270), r.uniform(18, 45), r.uniform(0, 2 * math.pi)
        c, n = (math.cos(a), math.sin(a)), (-math.sin(a) * 0.35, math.cos(a) * 0.35)
        d.polygon([(x, y), (x + s * (c[0] / 2 + n[0]), y + s * (c[1] / 2 + n[1])), (x + s * c[0], y + s * c[1]),
                   (x + s * (c[0] / 2 - n[0]), y + s * (c[1] / 2 - n[1]))],
                  fill=(r.randint(20, 70), r.randint(90, 185), r.randint(20, 60)))
    for _ in range(5):
        x = r.uniform(0, CANVAS)
        d.line([(x, 0), (x + r.uniform(-25, 25), r.uniform(90, 200))], fill=(60, 95, 25), width=4)


def _bg_snow(d, r):
    h = r.randint(95, 120)
    _grad(d, 0, h, (165, 185, 215), (215, 225, 240))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(248, 250, 252))
    for _ in range(6):
        x, y = r.uniform(0, CANVAS), r.uniform(h + 20, CANVAS)
        d.ellipse((x - 50, y - 8, x + 50, y + 8), fill=(222, 230, 244))
    for _ in range(r.randint(4, 7)):
        x, th = r.uniform(0, CANVAS), r.uniform(35, 70)
        d.polygon([(x, h - th), (x - th * 0.25, h + 4), (x + th * 0.25, h + 4)], fill=(30, 75, 50))
    for _ in range(90):
        x, y, s = r.uniform(0, CANVAS), r.uniform(0, CANVAS), r.uniform(1.5, 3.5)
        d.ellipse((x - s, y - s, x + s, y + s), fill=(255, 255, 255))


def _bg_beach(d, r):
    h1, h2 = r.randint(70, 95), r.randint(118, 138)
    _grad(d, 0, h1, (100, 175, 240), (185, 220, 245))
    _grad(d, h1, h2, (20, 90, 175), (40, 140, 200))
    for _ in range(12):
        x, y = r.uniform(0, CANVAS), r.uniform(h1 + 5, h2 - 5)
        d.line([(x, y), (x + r.uniform(15, 40), y)], fill=(200, 230, 250), width=2)
    d.rectangle((0, h2, CANVAS, CANVAS), fill=(238, 212, 150))
    d.line([(x, h2 + 3 * math.sin(x / 9)) for x in range(0, CANVAS + 8, 8)], fill=WHITE, width=5)
    for _ in range(40):
        x, y = r.uniform(0, CANVAS), r.uniform(h2 + 8, CANVAS)
        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(210, 180, 120))


def _bg_cobblestone(d, r):
    d.rectangle((0, 0, CANVAS, CANVAS), fill=(70, 68, 65))
    y = -r.uniform(0, 10)
    while y < CANVAS:
        hh = 14 + max(0, y) * 0.08
        x = -r.uniform(0, 30)
        while x < CANVAS:
            w, g = r.uniform(24, 34) * hh / 18, r.randint(110, 170)
            d.rounded_rectangle((x + 2, y + 2, x + w - 2, y + hh - 2), radius=5, fill=(g, g - 4, g - 12))
            x += w
        y += hh


def _bg_pink_fabric(d, r):
    d.rectangle((0, 0, CANVAS, CANVAS), fill=(240, 150, 190))
    for _ in range(8):
        y0, a, ph = r.uniform(-120, CANVAS), r.uniform(6, 16), r.uniform(0, 6)
        pts = [(x, y0 + 0.4 * x + a * math.sin(x / 30 + ph)) for x in range(-10, CANVAS + 20, 10)]
        d.line(pts, fill=(215, 100, 155), width=r.randint(6, 14))
        d.line([(x, y + 9) for x, y in pts], fill=(255, 195, 220), width=4)


def _bg_wooden_floor(d, r):
    h = r.randint(70, 100)
    _grad(d, 0, h, (228, 210, 175), (210, 190, 155))
    d.rectangle((0, h - 8, CANVAS, h), fill=(240, 235, 225))
    for y in range(h, CANVAS, 22):
        b = r.uniform(0.85, 1.15)
        d.rectangle((0, y, CANVAS, y + 22), fill=(int(165 * b), int(105 * b), int(55 * b)))
        d.line([(0, y), (CANVAS, y)], fill=(85, 50, 25), width=2)
        x = r.uniform(0, 120)
        while x < CANVAS:
            d.line([(x, y), (x, y + 22)], fill=(85, 50, 25), width=2)
            x += r.uniform(90, 160)
        for _ in range(3):
            gy, gx = y + r.uniform(5, 18), r.uniform(0, CANVAS)
            d.line([(gx, gy), (gx + r.uniform(30, 80), gy)], fill=(int(150 * b), int(94 * b), int(48 * b)))


def _bg_city(d, r):
    h = r.randint(150, 175)
    _grad(d, 0, h, (35, 45, 100), (235, 140, 90))
    x = -r.uniform(0, 20)
    while x < CANVAS:
        w, top, g = r.uniform(25, 50), r.uniform(30, h - 50), r.randint(45, 95)
        d.rectangle((x, top, x + w, h), fill=(g, g, g + 12))
        for wy in range(int(top) + 6, h - 8, 11):
            for wx in range(int(x) + 5, int(x + w) - 6, 9):
                if r.random() < 0.55:
                    d.rectangle((wx, wy, wx + 4, wy + 5), fill=(255, 215, 110))
        x += w + r.uniform(-4, 4)
    d.rectangle((0, h, CANVAS, CANVAS), fill=(70, 70, 76))
    for x in range(-int(r.uniform(0, 40)), CANVAS, 50):
        d.rectangle((x, h + 40, x + 25, h + 44), fill=(235, 200, 60))


def _bg_mountain(d, r):
    h = r.randint(140, 165)
    _grad(d, 0, h, (90, 150, 230), (190, 220, 245))
    px, py, bw = r.uniform(70, 186), r.uniform(20, 45), r.uniform(130, 170)
    qx = px + r.choice([-1, 1]) * r.uniform(80, 110)
    d.polygon([(qx - 110, h), (qx, py + 45), (qx + 110, h)], fill=(150, 160, 185))
    d.polygon([(px - bw, h), (px, py), (px + bw, h)], fill=(100, 105, 130))
    sy = py + (h - py) * 0.3
    k = (sy - py) / (h - py) * bw
    d.polygon([(px, py), (px + k, sy), (px + k * 0.4, sy - 8), (px, sy + 4), (px - k * 0.5, sy - 6), (px - k, sy)],
              fill=(245, 248, 252))
    _grad(d, h, CANVAS, (90, 170, 70), (60, 130, 45))


def _bg_blue_house(d, r):
    h = r.randint(135, 160)
    _grad(d, 0, h, (120, 185, 240), (200, 225, 245))
    _grad(d, h, CANVAS, (85, 175, 70), (60, 140, 50))
    w = r.uniform(150, 190)
    x0 = r.uniform(-40, CANVAS - w + 40)
    base, hh = h + 12, w * 0.55
    d.rectangle((x0, base - hh, x0 + w, base), fill=(40, 90, 210))
    d.polygon([(x0 - 12, base - hh), (x0 + w / 2, base - hh - w * 0.38), (x0 + w + 12, base - hh)], fill=(70, 60, 70))
    for fx in (0.15, 0.62):
        wx, wy = x0 + fx * w, base - hh * 0.75
        d.rectangle((wx, wy, wx + w * 0.22, wy + hh * 0.3), fill=WHITE)
        d.line([(wx + w * 0.11, wy), (wx + w * 0.11, wy + hh * 0.3)], fill=(40, 90, 210), width=3)
    d.rectangle((x0 + 0.42 * w, base - hh * 0.5, x0 + 0.58 * w, base), fill=(110, 65, 35))


def _bg_purple_rug(d, r):
    h = r.randint(135, 155)
    _grad(d, 0, h, (45, 95, 55), (30, 70, 35))
    for _ in range(9):
        x, w = r.uniform(-10, CANVAS), r.uniform(8, 20)
        d.rectangle((x, 0, x + w, h + r.uniform(0, 10)), fill=(85, 60, 35))
    for _ in range(14):
        x, y, s = r.uniform(0, CANVAS), r.uniform(-10, 50), r.uniform(25, 45)
        d.ellipse((x - s, y - s, x + s, y + s), fill=(r.randint(20, 45), r.randint(70, 110), 35))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(70, 85, 40))
    dx = r.uniform(-20, 20)
    d.polygon([(45 + dx, h + 10), (211 + dx, h + 10), (250, 250), (6, 250)], fill=(125, 45, 175))
    d.polygon([(60 + dx, h + 20), (196 + dx, h + 20), (230, 238), (26, 238)], outline=(185, 120, 225), width=4)
    d.polygon([(128 + dx / 2, h + 35), (160, 198), (128, 230), (96, 198)], fill=(165, 90, 210))


def _bg_wheat_field(d, r):
    h = r.randint(90, 120)
    _grad(d, 0, h, (150, 195, 240), (215, 230, 245))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(220, 180, 70))
    for _ in range(450):
        x, y = r.uniform(0, CANVAS), r.uniform(h, CANVAS + 10)
        ln = 4 + (y - h) * 0.12
        c = (245, 210, 110) if r.random() < 0.5 else (180, 135, 40)
        d.line([(x, y), (x + r.uniform(-2, 2), y - ln)], fill=c, width=2)


def _bg_autumn_tree(d, r):
    h = r.randint(140, 165)
    _grad(d, 0, h, (150, 190, 235), (210, 225, 240))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(170, 120, 60))
    leaves = [(230, 110, 20), (200, 45, 25), (245, 175, 30), (215, 80, 20)]
    for _ in range(120):
        x, y = r.uniform(0, CANVAS), r.uniform(h, CANVAS)
        d.ellipse((x - 3, y - 2, x + 3, y + 2), fill=r.choice(leaves))
    tx = r.choice([r.uniform(30, 80), r.uniform(176, 226)])
    d.polygon([(tx - 14, h + 5), (tx + 14, h + 5), (tx + 6, 70), (tx - 6, 70)], fill=(90, 55, 30))
    for _ in range(28):
        x, y, s = tx + r.gauss(0, 38), 70 + r.gauss(0, 22), r.uniform(16, 30)
        d.ellipse((x - s, y - s, x + s, y + s), fill=r.choice(leaves))


def _bg_eiffel_tower(d, r):
    h = r.randint(180, 200)
    _grad(d, 0, h, (140, 190, 240), (215, 230, 245))
    _grad(d, h, CANVAS, (110, 165, 85), (85, 140, 65))
    tx, top, c = r.uniform(55, 201), r.uniform(6, 20), (80, 70, 65)
    mid = h - 95
    d.polygon([(tx - 3, top), (tx + 3, top), (tx + 13, mid), (tx - 13, mid)], fill=c)
    for s in (-1, 1):
        d.polygon([(tx + s * 55, h), (tx + s * 37, h), (tx + s * 9, mid), (tx + s * 24, mid)], fill=c)
    d.rectangle((tx - 30, mid - 4, tx + 30, mid + 3), fill=c)
    d.rectangle((tx - 44, h - 50, tx + 44, h - 45), fill=c)
    d.arc((tx - 38, h - 45, tx + 38, h + 30), 180, 360, fill=c, width=5)
    for k in range(5):
        y = top + 20 + k * (mid - top - 20) / 5
        d.line([(tx - 6 - k * 1.5, y), (tx + 6 + k * 1.5, y + 14)], fill=(130, 120, 110), width=1)


def _bg_water(d, r):
    h = r.randint(30, 60)
    _grad(d, 0, h, (165, 205, 245), (200, 225, 248))
    _grad(d, h, CANVAS, (60, 140, 210), (20, 70, 160))
    for _ in range(45):
        x, y = r.uniform(-20, CANVAS), r.uniform(h + 5, CANVAS)
        w = 10 + (y - h) * 0.15
        d.arc((x, y, x + w, y + w * 0.4), 200, 340, fill=(130, 190, 240) if r.random() < 0.6 else (15, 55, 135),
              width=3)


def _bg_milk(d, r):
    h = r.randint(60, 95)
    _grad(d, 0, h, (250, 185, 135), (255, 225, 195))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(250, 248, 240))
    for _ in range(35):
        x, y = r.uniform(-20, CANVAS), r.uniform(h + 3, CANVAS)
        w = 14 + (y - h) * 0.25
        d.arc((x, y, x + w, y + w * 0.35), 190, 350, fill=(215, 210, 195), width=4)
        d.arc((x, y + 4, x + w, y + 4 + w * 0.35), 200, 340, fill=(255, 255, 255), width=2)


def _bg_sunflowers(d, r):
    h = r.randint(70, 100)
    _grad(d, 0, h, (110, 180, 240), (180, 215, 245))
    _grad(d, h, CANVAS, (80, 170, 55), (45, 125, 35))
    for _ in range(160):
        x, y = r.uniform(0, CANVAS), r.uniform(h, CANVAS)
        d.line([(x, y), (x + r.uniform(-3, 3), y - 6 - (y - h) * 0.05)], fill=(40, 110, 30), width=2)
    spots = [(r.uniform(0, CANVAS), h + r.uniform(0, 40)) for _ in range(14)]
    spots += [(r.choice([r.uniform(0, 50), r.uniform(206, 256)]), r.uniform(h + 50, CANVAS)) for _ in range(6)]
    for x, y in sorted(spots, key=lambda s: s[1]):
        s = 7 + (y - h) * 0.13
        d.line([(x, y), (x, y + 4 * s)], fill=(40, 120, 30), width=max(2, int(s / 4)))
        d.ellipse((x - s, y - s, x + s, y + s), fill=(255, 205, 0))
        d.ellipse((x - s * 0.45, y - s * 0.45, x + s * 0.45, y + s * 0.45), fill=(100, 55, 20))


def _bg_mirror(d, r):
    h = r.randint(90, 120)
    _grad(d, 0, h, (185, 165, 210), (165, 145, 195))
    _grad(d, h, CANVAS, (175, 190, 205), (95, 110, 130))
    for _ in range(3):
        x, w = r.uniform(-40, 200), r.uniform(10, 25)
        d.polygon([(x + 40, h), (x + 40 + w, h), (x + w, CANVAS), (x, CANVAS)], fill=(225, 232, 240))
    d.line([(0, h), (CANVAS, h)], fill=(120, 120, 135), width=5)


def _bg_sidewalk(d, r):
    h = r.randint(120, 145)
    d.rectangle((0, 0, CANVAS, h), fill=(150, 80, 60))
    for y in range(10, h - 20, 36):
        for x in range(int(r.uniform(0, 20)), CANVAS, 40):
            d.rectangle((x, y, x + 22, y + 22), fill=(60, 60, 75))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(195, 195, 190))
    for y in range(h + 25, CANVAS, 35):
        d.line([(0, y), (CANVAS, y)], fill=(150, 150, 145), width=2)
    people = [(r.uniform(-10, 266), h + r.uniform(-6, 14), r.uniform(60, 95)) for _ in range(r.randint(9, 13))]
    for x, feet, ph in sorted(people, key=lambda p: p[1]):  # the nearer drawn last
        w = ph * 0.28
        d.rectangle((x - w * 0.4, feet - ph * 0.45, x - 1, feet), fill=(40, 40, 60))
        d.rectangle((x + 1, feet - ph * 0.45, x + w * 0.4, feet), fill=(40, 40, 60))
        d.rounded_rectangle((x - w / 2, feet - ph * 0.82, x + w / 2, feet - ph * 0.42), radius=4,
                            fill=tuple(r.randint(30, 230) for _ in range(3)))
        s = ph * 0.1
        d.ellipse((x - s, feet - ph * 0.82 - 2 * s, x + s, feet - ph * 0.82),
                  fill=r.choice([(235, 195, 160), (170, 115, 75), (95, 62, 40)]))


def _bg_dirt_road(d, r):
    h = r.randint(85, 110)
    _grad(d, 0, h, (130, 190, 240), (200, 225, 245))
    _grad(d, h, CANVAS, (110, 170, 70), (80, 140, 50))
    vx = r.uniform(90, 166)
    d.polygon([(vx - 6, h), (vx + 6, h), (CANVAS + 50, CANVAS), (-50, CANVAS)], fill=(155, 115, 75))
    for tx in (60, 196):
        d.line([(vx, h), (tx, CANVAS)], fill=(125, 88, 55), width=9)
    for _ in range(70):
        y = r.uniform(h + 10, CANVAS)
        half = 6 + (y - h) / (CANVAS - h) * (CANVAS / 2 + 44)
        x = vx + (128 - vx) * (y - h) / (CANVAS - h) + r.uniform(-half, half)
        d.ellipse((x - 2, y - 1.5, x + 2, y + 1.5), fill=r.choice([(190, 155, 115), (115, 80, 50)]))


def _bg_white_rug(d, r):
    h = r.randint(60, 90)
    _grad(d, 0, h, (150, 172, 150), (135, 158, 135))
    d.rectangle((0, h, CANVAS, CANVAS), fill=(110, 70, 40))
    for y in range(h + 15, CANVAS, 20):
        d.line([(0, y), (CANVAS, y)], fill=(80, 50, 28), width=2)
    x0, y0 = r.uniform(5, 30), h + r.uniform(15, 35)
    d.rounded_rectangle((x0, y0, CANVAS - r.uniform(5, 30), CANVAS - 6), radius=30, fill=(246, 246, 242))
    for _ in range(260):
        x, y = r.uniform(x0 + 10, CANVAS - 40), r.uniform(y0 + 8, CANVAS - 14)
        d.line([(x, y), (x + r.uniform(-3, 3), y + 5)], fill=(222, 222, 215), width=2)


BACKGROUNDS = {
    "studio": _bg_studio, "jungle": _bg_jungle, "snow": _bg_snow, "beach": _bg_beach, "cobblestone": _bg_cobblestone,
    "pink_fabric": _bg_pink_fabric, "wooden_floor": _bg_wooden_floor, "city": _bg_city, "mountain": _bg_mountain,
    "blue_house": _bg_blue_house, "purple_rug": _bg_purple_rug, "wheat_field": _bg_wheat_field,
    "autumn_tree": _bg_autumn_tree, "eiffel_tower": _bg_eiffel_tower, "water": _bg_water, "milk": _bg_milk,
    "sunflowers": _bg_sunflowers, "mirror": _bg_mirror, "sidewalk": _bg_sidewalk, "dirt_road": _bg_dirt_road,
    "white_rug": _bg_white_rug}


@functools.lru_cache(maxsize=None)
def background(context, variant):
    """Background `variant` of `context`, RGBA at CANVAS resolution; drawn once and cached (21 x 8 x 256 KiB)."""
    im = Image.new("RGB", (CANVAS, CANVAS))
    BACKGROUNDS[context](ImageDraw.Draw(im), random.Random(f"{context}/{variant}"))  # a str seed is stable
    return im.convert("RGBA")


# --------------------------------------------------------------------------------------------------------------------
# objects: each class drawer paints its silhouette on a sprite of side S, with the body in KEY, and returns anchors
# (pixel positions of the body, the marking, the head, the eyes, the neck, ...) for the painting steps that follow.
# `p` scales unit coordinates to pixels; `cube` asks for the boxy "cube shaped" variant with the same class cues.

def _cube(d, p, x0, y0, x1, y1):
    """A box seen from the front right and slightly above; returns (faces to shade, faces to lighten)."""
    X0, Y0, X1, Y1 = p(x0, y0, x1, y1)
    k = 0.2 * (X1 - X0)
    top = [(X0, Y0 + k), (X0 + k, Y0), (X1, Y0), (X1 - k, Y0 + k)]
    side = [(X1 - k, Y0 + k), (X1, Y0), (X1, Y1 - k), (X1 - k, Y1)]
    d.rectangle((X0, Y0 + k, X1 - k, Y1), fill=KEY)
    d.polygon(top, fill=KEY)
    d.polygon(side, fill=KEY)
    return [side], [top]


def _steam(d, p, x0, x1, y):
    """Three white wisps rising from a hot drink: the mug's fixed-color cue."""
    for k in range(3):
        x = x0 + (k + 0.5) * (x1 - x0) / 3
        d.line([p(x + 0.04 * math.sin(2.2 * j + k), y - 0.06 * j) for j in range(5)], fill=WHITE,
               width=int(p(0.045)), joint="curve")


def _mug(d, p, cube):
    d.ellipse(p(0.56, 0.34, 0.92, 0.74), outline=KEY, width=int(p(0.08)))  # the handle
    if cube:
        shade, light = _cube(d, p, 0.12, 0.16, 0.7, 0.9)
        d.polygon(p(0.2, 0.24, 0.27, 0.19, 0.62, 0.19, 0.55, 0.24), fill=INK)
        _steam(d, p, 0.2, 0.62, 0.12)
        return dict(body=p(0.12, 0.16, 0.7, 0.9), mark=(*p(0.4, 0.58), p(0.13)), shade=shade, light=light)
    d.rectangle(p(0.14, 0.22, 0.72, 0.84), fill=KEY)
    d.ellipse(p(0.14, 0.76, 0.72, 0.92), fill=KEY)
    d.ellipse(p(0.14, 0.14, 0.72, 0.3), fill=WHITE)                        # a white rim around the coffee
    d.ellipse(p(0.19, 0.175, 0.67, 0.265), fill=(70, 40, 25))
    _steam(d, p, 0.2, 0.66, 0.1)
    return dict(body=p(0.14, 0.14, 0.72, 0.92), mark=(*p(0.43, 0.57), p(0.14)))


def _daisies(d, p, x, y):
    """Three white daisies on green stems standing in the vase's neck at (x, y): the vase's fixed-color cue."""
    for dx, dy in ((-0.17, -0.2), (0.0, -0.3), (0.17, -0.2)):
        cx, cy = x + dx, y + dy
        d.line(p(x, y + 0.03, cx, cy), fill=(40, 140, 50), width=int(p(0.03)))
        for k in range(8):
            a = k * math.pi / 4
            d.ellipse(_circle(*p(cx + 0.055 * math.cos(a), cy + 0.055 * math.sin(a)), p(0.035)), fill=WHITE)
        d.ellipse(_circle(*p(cx, cy), p(0.035)), fill=(250, 200, 20))


def _vase(d, p, cube):
    _daisies(d, p, 0.5, 0.06)
    if cube:
        shade, light = _cube(d, p, 0.22, 0.32, 0.8, 0.95)
        d.rectangle(p(0.4, 0.06, 0.6, 0.34), fill=KEY)
        d.ellipse(p(0.4, 0.03, 0.6, 0.09), fill=INK)
        return dict(body=p(0.22, 0.06, 0.8, 0.95), mark=(*p(0.46, 0.66), p(0.14)), shade=shade, light=light)
    ys = (0.05, 0.1, 0.16, 0.3, 0.45, 0.62, 0.78, 0.9, 0.95)
    hw = (0.14, 0.12, 0.08, 0.1, 0.24, 0.31, 0.25, 0.15, 0.16)
    d.polygon([p(0.5 + w, y) for w, y in zip(hw, ys)] + [p(0.5 - w, y) for w, y in zip(hw, ys)][::-1], fill=KEY)
    d.ellipse(p(0.38, 0.03, 0.62, 0.08), fill=INK)
    return dict(body=p(0.19, 0.05, 0.81, 0.95), mark=(*p(0.5, 0.62), p(0.15)))


def _backpack(d, p, cube):
    d.arc(p(0.36, 0.02, 0.64, 0.26), 180, 360, fill=INK, width=int(p(0.05)))
    for x in (0.1, 0.78):
        d.rounded_rectangle(p(x, 0.26, x + 0.12, 0.84), radius=p(0.04), fill=(55, 55, 60))
    if cube:
        shade, light = _cube(d, p, 0.16, 0.12, 0.86, 0.93)
    else:
        shade, light = [], []
        d.rounded_rectangle(p(0.18, 0.12, 0.82, 0.93), radius=p(0.16), fill=KEY)
    d.rounded_rectangle(p(0.28, 0.56, 0.68, 0.86), radius=p(0.06), fill=KEY, outline=INK, width=int(p(0.025)))
    d.line(p(0.3, 0.3, 0.66, 0.3), fill=INK, width=int(p(0.025)))
    return dict(body=p(0.18, 0.12, 0.82, 0.93), mark=(*p(0.48, 0.41), p(0.12)), shade=shade, light=light)


def _teapot(d, p, cube):
    d.ellipse(p(0.03, 0.4, 0.33, 0.76), outline=INK, width=int(p(0.07)))        # a black handle
    d.polygon(p(0.7, 0.55, 0.95, 0.3, 0.99, 0.35, 0.8, 0.78), fill=KEY)
    shade, light = _cube(d, p, 0.16, 0.38, 0.84, 0.92) if cube else ([], [])
    if not cube:
        d.ellipse(p(0.15, 0.36, 0.85, 0.93), fill=KEY)
    d.ellipse(p(0.3, 0.26, 0.7, 0.44), fill=WHITE, outline=INK, width=int(p(0.02)))  # a white lid
    d.ellipse(p(0.42, 0.15, 0.58, 0.3), fill=INK)                                     # and a black knob
    return dict(body=p(0.15, 0.36, 0.85, 0.93), mark=(*p(0.5, 0.64), p(0.14)), shade=shade, light=light)


def _sneaker(d, p, cube):
    if cube:
        shade, light = _cube(d, p, 0.08, 0.34, 0.94, 0.74)
    else:
        shade, light = [], []
        pts = ((0.08, 0.74), (0.09, 0.42), (0.2, 0.37), (0.34, 0.46), (0.44, 0.43), (0.48, 0.3), (0.58, 0.31),
               (0.6, 0.42), (0.8, 0.55), (0.94, 0.61), (0.97, 0.74))
        d.polygon([p(x, y) for x, y in pts], fill=KEY)
        d.ellipse(p(0.12, 0.38, 0.32, 0.46), fill=INK)
    d.rounded_rectangle(p(0.05, 0.72, 0.98, 0.84), radius=p(0.05), fill=WHITE, outline=(150, 150, 150),
                        width=int(p(0.015)))
    for k in range(4):
        x = 0.5 + k * 0.07
        d.line(p(x, 0.43 + k * 0.04, x + 0.06, 0.4 + k * 0.04), fill=WHITE, width=int(p(0.03)))
    return dict(body=p(0.08, 0.3, 0.97, 0.74), mark=(*p(0.36, 0.6), p(0.1)), shade=shade, light=light)


def _clock(d, p, cube):
    for x in (0.14, 0.62):
        d.ellipse(p(x, 0.06, x + 0.24, 0.3), fill=KEY)
    d.line(p(0.3, 0.8, 0.2, 0.96), fill=INK, width=int(p(0.05)))
    d.line(p(0.7, 0.8, 0.8, 0.96), fill=INK, width=int(p(0.05)))
    if cube:
        shade, light = _cube(d, p, 0.12, 0.14, 0.9, 0.9)
        d.rectangle(p(0.18, 0.3, 0.7, 0.84), fill=INK)
        d.rectangle(p(0.23, 0.35, 0.65, 0.79), fill=WHITE)
        c, rr = p(0.44, 0.57), p(0.2)
    else:
        shade, light = [], []
        d.ellipse(p(0.14, 0.16, 0.86, 0.88), fill=KEY)
        d.ellipse(p(0.2, 0.22, 0.8, 0.82), fill=INK)                          # a black bezel
        d.ellipse(p(0.25, 0.27, 0.75, 0.77), fill=WHITE)
        c, rr = p(0.5, 0.52), p(0.2)
    for k in range(12):
        a = k * math.pi / 6
        x, y = c[0] + rr * math.cos(a), c[1] + rr * math.sin(a)
        d.ellipse(_circle(x, y, rr * 0.09), fill=INK)
    d.line([*c, c[0] - rr * 0.55, c[1] - rr * 0.45], fill=INK, width=int(p(0.06)))
    d.line([*c, c[0] + rr * 0.65, c[1] - rr * 0.6], fill=INK, width=int(p(0.045)))
    return dict(body=p(0.14, 0.16, 0.86, 0.88), mark=(c[0], c[1] + rr * 0.55, rr * 0.3), face=WHITE,
                shade=shade, light=light)


def _dog(d, p, cube):
    """A dog standing in profile, facing right, with a floppy ear."""
    d.line(p(0.18, 0.5, 0.05, 0.2), fill=KEY, width=int(p(0.07)))
    legs = [p(x, 0.62, x + 0.09, 0.93) for x in (0.16, 0.3, 0.52, 0.64)]
    for leg in legs:
        d.rectangle(leg, fill=KEY)
    head = (*p(0.75, 0.3), p(0.17))
    if cube:
        shade, light = _cube(d, p, 0.1, 0.34, 0.76, 0.74)
        d.rectangle(p(0.6, 0.14, 0.9, 0.46), fill=KEY)
        d.rectangle(p(0.86, 0.3, 0.99, 0.44), fill=KEY)
    else:
        shade, light = [], []
        d.ellipse(p(0.1, 0.36, 0.78, 0.74), fill=KEY)
        d.polygon(p(0.6, 0.42, 0.66, 0.26, 0.8, 0.36, 0.76, 0.5), fill=KEY)
        d.ellipse(_circle(*head), fill=KEY)
        d.ellipse(p(0.8, 0.3, 0.99, 0.45), fill=WHITE)                          # a white muzzle
    if cube:
        d.rectangle(p(0.86, 0.3, 0.99, 0.44), fill=WHITE)
    d.ellipse(p(0.92, 0.29, 0.99, 0.37), fill=INK)
    ear = p(0.64, 0.18, 0.73, 0.15, 0.71, 0.5, 0.62, 0.46)
    d.polygon(ear, fill=INK)                                                     # a black ear
    d.ellipse(p(0.78, 0.24, 0.82, 0.28), fill=INK)
    return dict(body=p(0.1, 0.14, 0.99, 0.93), mark=(*p(0.38, 0.52), p(0.11)), head=head, eyes=[p(0.8, 0.26)],
                neck=[p(0.6, 0.32), p(0.7, 0.5)], torso=p(0.27, 0.4, 0.72, 0.7), paws=[p(x, 0.86, x + 0.09, 0.93)
                for x in (0.16, 0.3, 0.52, 0.64)], shade=shade, light=light)


def _cat(d, p, cube):
    """A cat sitting, facing the viewer, with pointed ears and a curled tail."""
    d.arc(p(0.5, 0.45, 0.96, 0.96), 250, 100, fill=KEY, width=int(p(0.07)))
    head = (*p(0.5, 0.3), p(0.19))
    if cube:
        shade, light = _cube(d, p, 0.24, 0.46, 0.78, 0.94)
        d.rectangle(p(0.31, 0.12, 0.69, 0.47), fill=KEY)
    else:
        shade, light = [], []
        d.ellipse(p(0.24, 0.42, 0.76, 0.94), fill=KEY)
        d.ellipse(_circle(*head), fill=KEY)
    for s in (-1, 1):
        d.polygon(p(0.5 + s * 0.19, 0.26, 0.5 + s * 0.17, 0.02, 0.5 + s * 0.03, 0.15),
                  fill=KEY)
        d.polygon(p(0.5 + s * 0.16, 0.2, 0.5 + s * 0.155, 0.08, 0.5 + s * 0.07, 0.15),
                  fill=(245, 160, 175))
    paws = [p(x, 0.86, x + 0.15, 0.96) for x in (0.3, 0.55)]
    for paw in paws:
        d.ellipse(paw, fill=KEY)
    d.ellipse(p(0.37, 0.5, 0.63, 0.76), fill=WHITE)                             # a white chest
    d.ellipse(p(0.4, 0.31, 0.6, 0.43), fill=WHITE)                              # and muzzle
    eyes = [p(0.42, 0.28), p(0.58, 0.28)]
    for x, y in eyes:
        d.ellipse(_circle(x, y, p(0.035)), fill=INK)
    d.polygon(p(0.46, 0.33, 0.54, 0.33, 0.5, 0.38), fill=(230, 120, 140))
    for s in (-1, 1):                                                            # whiskers
        for dy in (-0.025, 0.025):
            d.line(p(0.5 + s * 0.08, 0.37 + dy, 0.5 + s * 0.25, 0.35 + 2 * dy), fill=INK, width=int(p(0.015)))
    return dict(body=p(0.24, 0.02, 0.76, 0.96), mark=(*p(0.5, 0.64), p(0.1)), head=head, eyes=eyes,
                neck=[p(0.36, 0.47), p(0.64, 0.47)], torso=p(0.31, 0.5, 0.69, 0.88), paws=paws, shade=shade,
                light=light)


DRAWERS = {"mug": _mug, "vase": _vase, "backpack": _backpack, "teapot": _teapot, "sneaker": _sneaker,
           "clock": _clock, "dog": _dog, "cat": _cat}


# --------------------------------------------------------------------------------------------------------------------
# markings (subjects only) and accessories (live classes): drawn on top of the painted body, at the anchors

def _heart(d, cx, cy, r, c):
    d.ellipse((cx - 0.95 * r, cy - 0.75 * r, cx + 0.05 * r, cy + 0.25 * r), fill=c)
    d.ellipse((cx - 0.05 * r, cy - 0.75 * r, cx + 0.95 * r, cy + 0.25 * r), fill=c)
    d.polygon([(cx - 0.9 * r, cy), (cx + 0.9 * r, cy), (cx, cy + 0.95 * r)], fill=c)


def _bolt(d, cx, cy, r, c):
    pts = ((0.25, -1), (-0.55, 0.15), (-0.02, 0.15), (-0.25, 1), (0.55, -0.2), (0.02, -0.2))
    d.polygon([(cx + x * r, cy + y * r) for x, y in pts], fill=c)


def _sun(d, cx, cy, r, c):
    for k in range(8):
        a = k * math.pi / 4
        d.line([(cx + 0.6 * r * math.cos(a), cy + 0.6 * r * math.sin(a)), (cx + 1.1 * r * math.cos(a),
                cy + 1.1 * r * math.sin(a))], fill=c, width=max(2, int(0.22 * r)))
    d.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=c)


MARKINGS = {
    "star": lambda d, a, c: d.polygon(_star(*a["mark"]), fill=c),
    "heart": lambda d, a, c: _heart(d, *a["mark"], c),
    "bolt": lambda d, a, c: _bolt(d, *a["mark"], c),
    "sun": lambda d, a, c: _sun(d, *a["mark"], c),
    "diamond": lambda d, a, c: d.polygon([(a["mark"][0] + x * a["mark"][2], a["mark"][1] + y * a["mark"][2])
                                          for x, y in ((0, -1.1), (0.7, 0), (0, 1.1), (-0.7, 0))], fill=c),
    "moon": lambda d, a, c: (d.ellipse(_circle(*a["mark"]), fill=c),
                             d.ellipse(_circle(a["mark"][0] + 0.45 * a["mark"][2], a["mark"][1] - 0.2 * a["mark"][2],
                                               0.8 * a["mark"][2]), fill=a["face"])),
    "cross": lambda d, a, c: [d.rectangle((a["mark"][0] - w * a["mark"][2], a["mark"][1] - h * a["mark"][2],
                                           a["mark"][0] + w * a["mark"][2], a["mark"][1] + h * a["mark"][2]), fill=c)
                              for w, h in ((1.0, 0.33), (0.33, 1.0))],
    "ring": lambda d, a, c: d.ellipse(_circle(*a["mark"]), outline=c, width=max(2, int(0.38 * a["mark"][2]))),
    "patch": lambda d, a, c: d.ellipse(_circle(*a["eyes"][0], a["head"][2] * 0.45), fill=c),
    "socks": lambda d, a, c: [d.ellipse(b, fill=c) for b in a["paws"]],
}


def _circle(cx, cy, r):
    return (cx - r, cy - r, cx + r, cy + r)


def _neckband(d, a, colors, width):
    """Parallel bands across the neck, one per color (a collar is one band, the rainbow scarf six)."""
    (x0, y0), (x1, y1) = a["neck"]
    n = math.hypot(y1 - y0, x0 - x1)
    nx, ny = (y1 - y0) / n, (x0 - x1) / n
    for k, c in enumerate(colors):
        o = (k - (len(colors) - 1) / 2) * width
        d.line([(x0 + nx * o, y0 + ny * o), (x1 + nx * o, y1 + ny * o)], fill=c, width=int(width) + 1)
    return x1, y1


def _hat(d, a, kind):
    cx, cy, r = a["head"]
    t, r = cy - 0.75 * r, 1.35 * r  # where the hat sits, and its size
    if kind == "red hat":
        d.ellipse((cx - 1.3 * r, t - 0.2 * r, cx + 1.3 * r, t + 0.25 * r), fill=(200, 20, 25))
        d.chord((cx - 0.8 * r, t - 1.3 * r, cx + 0.8 * r, t + 0.6 * r), 180, 360, fill=(215, 25, 30))
        d.rectangle((cx - 0.8 * r, t - 0.2 * r, cx + 0.8 * r, t), fill=(120, 10, 15))
    elif kind == "santa hat":
        d.polygon([(cx - r, t), (cx + r, t), (cx + 1.3 * r, t - 1.4 * r)], fill=(210, 20, 30))
        d.rounded_rectangle((cx - 1.15 * r, t - 0.25 * r, cx + 1.15 * r, t + 0.3 * r), radius=0.2 * r, fill=WHITE)
        d.ellipse(_circle(cx + 1.3 * r, t - 1.4 * r, 0.3 * r), fill=WHITE)
    elif kind == "top hat":
        d.rectangle((cx - 1.25 * r, t - 0.15 * r, cx + 1.25 * r, t + 0.15 * r), fill=(15, 15, 20))
        d.rectangle((cx - 0.7 * r, t - 1.5 * r, cx + 0.7 * r, t), fill=(20, 20, 25))
        d.rectangle((cx - 0.7 * r, t - 0.45 * r, cx + 0.7 * r, t - 0.2 * r), fill=(90, 90, 100))
    elif kind == "toque":
        d.rectangle((cx - 0.75 * r, t - 0.5 * r, cx + 0.75 * r, t + 0.15 * r), fill=WHITE)
        for dx, dy in ((-0.5, -0.9), (0.5, -0.9), (0, -1.25)):
            d.ellipse(_circle(cx + dx * r, t + dy * r, 0.6 * r), fill=WHITE, outline=(190, 190, 190))
    elif kind == "helmet":
        d.ellipse((cx - 1.35 * r, t - 0.15 * r, cx + 1.35 * r, t + 0.3 * r), fill=(225, 175, 10))
        d.chord((cx - 0.9 * r, t - 1.0 * r, cx + 0.9 * r, t + 0.8 * r), 180, 360, fill=(250, 205, 20))
        d.ellipse(_circle(cx, t - 0.4 * r, 0.22 * r), fill=(200, 30, 20))
    elif kind == "cap":
        d.rectangle((cx - 0.85 * r, t - 0.75 * r, cx + 0.85 * r, t + 0.1 * r), fill=(25, 35, 90))
        d.ellipse((cx - 0.3 * r, t - 0.05 * r, cx + 1.3 * r, t + 0.35 * r), fill=(10, 10, 15))
        d.polygon(_star(cx, t - 0.4 * r, 0.28 * r), fill=(245, 200, 40))
    elif kind == "wizard":
        d.polygon([(cx - 1.1 * r, t + 0.1 * r), (cx + 1.1 * r, t + 0.1 * r), (cx + 0.2 * r, t - 2.2 * r)],
                  fill=(115, 40, 180))
        d.polygon(_star(cx + 0.05 * r, t - 0.7 * r, 0.35 * r), fill=(255, 220, 40))


def _outfit(d, a, coat, trim=None, hat=None):
    """A coat over the torso, trimmed with reflective stripes, stars or buttons of color `trim`, and a hat."""
    x0, y0, x1, y1 = a["torso"]
    d.ellipse((x0, y0, x1, y1), fill=coat)
    if trim == "stripes":
        for f in (0.45, 0.7):
            d.line([(x0 + 0.06 * (x1 - x0), y0 + f * (y1 - y0)), (x1 - 0.06 * (x1 - x0), y0 + f * (y1 - y0))],
                   fill=(250, 235, 60), width=int(0.09 * (y1 - y0)))
    elif trim == "stars":
        for fx, fy in ((0.35, 0.35), (0.65, 0.6)):
            d.polygon(_star(x0 + fx * (x1 - x0), y0 + fy * (y1 - y0), 0.16 * (y1 - y0)), fill=(255, 220, 40))
    elif trim:
        for k in range(3):
            d.ellipse(_circle(x0 + 0.5 * (x1 - x0), y0 + (0.25 + 0.25 * k) * (y1 - y0), 0.05 * (y1 - y0)), fill=trim)
    if hat:
        _hat(d, a, hat)


def _glasses(d, a, color, n):
    r = a["head"][2] * 0.4
    for x, y in a["eyes"][:n]:
        d.ellipse(_circle(x, y, r), fill=color[:3] + (120,), outline=color, width=max(2, int(r * 0.35)))
    if n == 2:
        (xa, ya), (xb, yb) = a["eyes"]
        d.line([(xa + r, ya), (xb - r, yb)], fill=color, width=max(2, int(r * 0.3)))
    else:
        x, y = a["eyes"][0]
        d.line([(x - r, y), (x - 2.4 * r, y - 0.3 * r)], fill=color, width=max(2, int(r * 0.3)))


def _draw_accessory(d, a, accessory):
    if accessory in ("red hat", "santa hat"):
        _hat(d, a, accessory)
    elif accessory == "rainbow scarf":
        x, y = _neckband(d, a, [(230, 30, 30), (250, 140, 0), (250, 220, 0), (40, 170, 50), (40, 90, 220),
                                (130, 50, 190)], a["head"][2] * 0.2)
        d.rectangle((x - 0.15 * a["head"][2], y, x + 0.15 * a["head"][2], y + 0.8 * a["head"][2]), fill=(250, 140, 0))
    elif accessory == "top hat and monocle":
        _hat(d, a, "top hat")
        _glasses(d, a, (230, 190, 50), 1)
    elif accessory == "chef outfit":
        _outfit(d, a, (250, 250, 250), trim=INK, hat="toque")
    elif accessory == "firefighter outfit":
        _outfit(d, a, (175, 135, 60), trim="stripes", hat="helmet")
    elif accessory == "police outfit":
        _outfit(d, a, (25, 35, 90), trim=(245, 200, 40), hat="cap")
    elif accessory == "pink glasses":
        _glasses(d, a, (255, 90, 190), len(a["eyes"]))
    elif accessory == "yellow shirt":
        _outfit(d, a, (255, 225, 0))
    elif accessory == "purple wizard outfit":
        _outfit(d, a, (110, 40, 175), trim="stars", hat="wizard")


# --------------------------------------------------------------------------------------------------------------------
# painting a sprite

def _fill(size, top, bottom, split, pattern, rng):
    """The body's paint: `top` above row `split`, `bottom` below, and the pattern in white (dark on light colors)."""
    im = Image.new("RGB", size, top)
    W, S = size
    if bottom != top:
        im.paste(bottom, (0, split, W, S))
    ink = INK if 0.299 * top[0] + 0.587 * top[1] + 0.114 * top[2] > 170 else WHITE
    d, o = ImageDraw.Draw(im), rng.randrange(24)
    if pattern == "striped":  # period 24 at 4x: 6 output pixels
        for y in range(o - 24, S, 24):
            d.rectangle((0, y, W, y + 8), fill=ink)
    elif pattern == "dotted":
        for j, y in enumerate(range(o - 24, S + 12, 12)):
            for x in range(o - 24 + 12 * (j % 2), W + 12, 24):
                d.ellipse((x - 5, y - 5, x + 5, y + 5), fill=ink)
    elif pattern == "checkered":
        for j, y in enumerate(range(o - 32, S, 16)):
            for x in range(o - 32 + 16 * (j % 2), W, 32):
                d.rectangle((x, y, x + 15, y + 15), fill=ink)
    return im


def _vivid(c, f):
    g = sum(c) / 3
    return tuple(max(0, min(255, round(g + (v - g) * f))) for v in c)


def sprite(cls, look, prop, accessory, S, rng):
    """The object on a transparent RGBA image, cropped to it: silhouette, body paint, marking, property, accessory.
    Class drawers draw in a unit square of side S; the image leaves room around it for hats and tails."""
    size, off = (int(1.5 * S), int(1.6 * S)), (0.25 * S, 0.5 * S)
    im = Image.new("RGBA", size)
    d = ImageDraw.Draw(im, "RGBA")
    p = lambda *v: v[0] * S if len(v) == 1 else [off[i % 2] + c * S for i, c in enumerate(v)]  # noqa: E731
    a = DRAWERS[cls](d, p, prop == "cube shaped")
    top, bottom = look.top, look.bottom
    if prop == "shiny":
        top, bottom = _vivid(top, 1.3), _vivid(bottom, 1.3)
    elif prop == "wet":
        top, bottom = tuple(round(0.68 * v) for v in top), tuple(round(0.68 * v) for v in bottom)
    body = np.asarray(im).view(np.uint32)[..., 0] == KEY32  # (H, W) bool: where the body was drawn
    mask = Image.fromarray(body.astype(np.uint8) * 255)
    split = int((a["body"][1] + a["body"][3]) / 2)
    im.paste(_fill(size, top, bottom, split, look.pattern, rng), (0, 0), mask)
    for poly in a.get("shade", ()):
        d.polygon(poly, fill=(0, 0, 0, 70))
    for poly in a.get("light", ()):
        d.polygon(poly, fill=(255, 255, 255, 70))
    if look.marking:
        MARKINGS[look.marking](d, a, look.mark_color)
    if look.collar:
        x, y = _neckband(d, a, [look.collar], a["head"][2] * 0.22)
        d.ellipse(_circle(x, y + 0.1 * a["head"][2], 0.2 * a["head"][2]), fill=(245, 200, 40))
    x0, y0, x1, y1 = a["body"]
    w, h = x1 - x0, y1 - y0
    if prop == "shiny":  # specular highlights and a darker rim, kept on the body by the body mask
        hl = Image.new("L", size)
        hd = ImageDraw.Draw(hl)
        hd.ellipse((x0 + 0.16 * w, y0 + 0.2 * h, x0 + 0.3 * w, y0 + 0.62 * h), fill=235)
        hd.ellipse((x0 + 0.36 * w, y0 + 0.2 * h, x0 + 0.44 * w, y0 + 0.3 * h), fill=255)
        im.paste((255, 255, 255), (0, 0), ImageChops.multiply(hl, mask))
        rim = Image.new("L", size)
        ImageDraw.Draw(rim).rectangle((x0 + 0.78 * w, y0, x1, y1), fill=90)
        im.paste((0, 0, 0), (0, 0), ImageChops.multiply(rim, mask))
    elif prop == "wet":  # droplets on the body
        ys, xs = np.nonzero(body)
        rd = max(4.0, 0.035 * S)
        for _ in range(12):
            i = rng.randrange(len(ys))
            d.ellipse(_circle(xs[i], ys[i], rd), fill=(185, 215, 250), outline=(90, 120, 170))
            d.ellipse(_circle(xs[i] - rd * 0.3, ys[i] - rd * 0.3, rd * 0.35), fill=(255, 255, 255))
    if accessory:
        _draw_accessory(d, a, accessory)
    return im.crop(im.getchannel("A").getbbox())
