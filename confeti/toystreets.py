"""ToyStreets: a procedural two-domain street-scene benchmark that mimics GTA5 -> Cityscapes.

Taught in notebooks/01_data.ipynb.

A pinhole camera looks down a straight street: ground row ``y = y_h + f * cam_h / z`` and
lateral pixel ``x = v_x + f * X / z`` for a world point (X, z) on the ground, so every object is
scaled by ``s(z) = f / z`` pixels per metre and drawn far-to-near (painter's order, occlusion).
All 19 Cityscapes classes occur with long-tailed frequencies. The source domain "game" and the
target domain "city" differ in appearance (per-class colours, saturation, lighting and shadows,
per-class textures, sensor noise, blur, vignetting, colour cast) and in content (class
frequencies, object sizes, horizon and camera height). ``appearance_gap`` and ``content_gap``
in [0, 1] move the target from the source (0) to the full target (1). numpy only.

Shape: ``render_scene`` -> rgb uint8 (H, W, 3), label ids uint8 (H, W) (Cityscapes label ids).
"""

from __future__ import annotations

import json
import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .labels import LABEL_ID_OF_TRAIN_ID, NUM_CLASSES, PALETTE

# Bumped whenever the default benchmark changes (recorded in toystreets.json; a folder without
# it is version 1): `make reproduce` refuses data and runs of another version.
VERSION = 2
DOMAINS = ("game", "city")
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY) = range(11)
(PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BIKE) = range(11, 19)
NONE = 255  # pixels of no class (written as label id 0, "unlabeled")

# ---- appearance: one colour per material and domain (RGB 0..255) --------------------------
# The target swaps and shifts hues on purpose (road <-> sidewalk tones, blue sky -> overcast,
# green -> teal vegetation, yellow -> blue signs ...) so colour alone misleads a source model.
_MATERIALS = {  # name: (game, city)
    "road": ((92, 84, 108), (138, 126, 98)),
    "sidewalk": ((178, 160, 140), (96, 98, 118)),
    "building": ((158, 104, 82), (128, 138, 150)),
    "window": ((70, 110, 160), (210, 200, 150)),
    "wall": ((200, 190, 120), (120, 96, 110)),
    "fence": ((150, 100, 50), (70, 130, 120)),
    "pole": ((55, 55, 60), (170, 160, 140)),
    "light": ((30, 30, 30), (205, 180, 50)),
    "sign": ((235, 205, 30), (40, 80, 185)),
    "veg": ((55, 165, 45), (60, 105, 110)),
    "terrain": ((160, 180, 70), (140, 100, 60)),
    "sky": ((95, 160, 245), (220, 212, 190)),
    "skin": ((230, 180, 140), (150, 110, 90)),
    "rider": ((230, 60, 60), (80, 160, 200)),
    "truck": ((60, 120, 210), (190, 90, 40)),
    "bus": ((235, 185, 25), (90, 170, 90)),
    "train": ((190, 40, 40), (200, 200, 215)),
    "moto": ((30, 30, 35), (210, 120, 180)),
    "bike": ((40, 70, 200), (230, 230, 90)),
    "tyre": ((20, 20, 20), (60, 55, 50)),
    "glass": ((40, 60, 90), (170, 190, 200)),
    "lane": ((250, 250, 250), (230, 200, 80)),
    "clutter": ((120, 90, 120), (90, 120, 90)),
}
# car paints: vivid in the game, muted in the city (the colour is not the class)
_CAR_PAINTS = {
    "game": np.array([[220, 30, 30], [30, 80, 220], [240, 240, 240], [30, 30, 30], [250, 200, 0]]),
    "city": np.array([[110, 110, 115], [60, 60, 70], [170, 170, 165], [95, 60, 50], [50, 75, 70]]),
}
_CLOTHES = {
    "game": np.array([[200, 40, 160], [40, 200, 200], [250, 120, 20], [120, 40, 200]]),
    "city": np.array([[60, 60, 80], [120, 100, 80], [40, 40, 40], [150, 140, 150]]),
}
# per-class texture amplitude (0..1 scale) of fine grain and blotchy low-frequency noise
_TEX_FINE = {"game": np.full(19, 0.015), "city": np.full(19, 0.06)}
_TEX_BLOB = {"game": np.full(19, 0.03), "city": np.full(19, 0.04)}
_TEX_FINE["city"][[ROAD, SIDEWALK, TERRAIN]] = 0.12
_TEX_BLOB["game"][[VEG, TERRAIN]] = 0.06
_TEX_BLOB["city"][[VEG, BUILDING, SKY]] = 0.15
# per-domain image-level appearance: saturation, contrast, gamma, cast, noise, blur, vignette
_LOOK = {
    "game": dict(sat=1.25, contrast=1.15, gamma=0.95, cast=(1.0, 1.0, 1.0), noise=0.0,
                 blur=0.0, vignette=0.0, shadow=0.45, sun=0.25),
    "city": dict(sat=0.7, contrast=0.85, gamma=1.1, cast=(0.92, 1.02, 1.12), noise=0.035,
                 blur=1.0, vignette=0.35, shadow=0.1, sun=0.0),
}  # fmt: skip
# ---- content: geometry and class frequencies ------------------------------------------------
_CONTENT = {
    "game": dict(horizon=0.40, cam_h=1.9, focal=0.55, road_w=9.0, sidewalk_w=3.0,
                 n_cars=5.0, n_trucks=1.0, n_buses=0.5, p_train=0.05, n_persons=2.0,
                 n_riders=0.3, p_moto=0.6, n_bikes=0.3, n_poles=3.0, n_trees=5.0,
                 p_terrain=0.7, p_wall=0.5, p_fence=0.5, building_h=14.0, car_scale=1.1, hood=0.0),
    "city": dict(horizon=0.50, cam_h=1.3, focal=0.75, road_w=7.0, sidewalk_w=3.5,
                 n_cars=3.0, n_trucks=0.4, n_buses=0.3, p_train=0.03, n_persons=5.0,
                 n_riders=0.6, p_moto=0.3, n_bikes=1.2, n_poles=5.0, n_trees=2.5,
                 p_terrain=0.35, p_wall=0.35, p_fence=0.35, building_h=20.0, car_scale=0.95, hood=0.08),
}  # fmt: skip


# The tables above describe an extreme city look; the full appearance gap (appearance_gap=1)
# goes this fraction of the way there, per part of the look (APPEARANCE_PARTS below). Version 1
# used 0.3 for every part and no within-class variation. Version 2 is the variant "f1" of the
# calibration on source-only, the oracle, fda and selftrain at 12,800 iterations (README,
# "Calibrating ToyStreets"; results/calibration.json).
APPEARANCE_STRENGTH = {"colour": 0.3, "tone": 0.6, "texture": 0.6, "lighting": 0.6, "sensor": 0.6}  # fmt: skip
WITHIN_CLASS = 0.15  # the default within-class colour variation of the city (gap_knobs)


def _lerp(a, b, t):
    return a + (b - a) * t


# The gap's parts, each a knob that scales its share of the full gap (1 = the default
# benchmark, 0 = the city takes the game's values for that part; range: knob_top).
APPEARANCE_PARTS = {
    "colour": (),  # per-class material colours, car paints and clothes
    "tone": ("sat", "contrast", "gamma", "cast"),  # the global colour grade of the camera
    "texture": (),  # per-class fine grain and blotchy noise (tex_fine, tex_blob)
    "lighting": ("shadow", "sun"),
    "sensor": ("noise", "blur", "vignette"),
}
CONTENT_PARTS = {
    "layout": ("horizon", "cam_h", "focal", "road_w", "sidewalk_w", "building_h", "hood"),
    "frequency": (
        "n_cars",
        "n_trucks",
        "n_buses",
        "p_train",
        "n_persons",
        "n_riders",
        "p_moto",
        "n_bikes",
        "n_poles",
        "n_trees",
        "p_terrain",
        "p_wall",
        "p_fence",
    ),  # fmt: skip
    "scale": ("car_scale",),
}
GAP_KNOBS = (*(f"{k}_gap" for k in (*APPEARANCE_PARTS, *CONTENT_PARTS)), "within_class")


def knob_top(knob: str) -> float:
    """The largest value of a knob: ``1 / APPEARANCE_STRENGTH[part]`` for an appearance part
    (the extreme city look of the tables above), 1 for the others."""
    part = knob.removesuffix("_gap")
    return 1.0 / APPEARANCE_STRENGTH[part] if part in APPEARANCE_STRENGTH else 1.0


def gap_knobs(**knobs) -> dict:
    """The knobs of the gap's parts, defaults filled in and checked: ``colour_gap``,
    ``tone_gap``, ``texture_gap``, ``lighting_gap``, ``sensor_gap`` (appearance),
    ``layout_gap``, ``frequency_gap``, ``scale_gap`` (content), each default 1, and
    ``within_class`` in [0, 1] (default ``WITHIN_CLASS``): the city's objects of one class get
    colours that differ by up to that fraction per channel, so colour stops being a class label
    that a generator can map back one to one.

    Content parts lie in [0, 1]. An appearance part may exceed 1, which strengthens it beyond
    the default benchmark, up to the extreme city look at ``knob_top``."""
    bad = set(knobs) - set(GAP_KNOBS)
    if bad:
        raise ValueError(f"unknown ToyStreets knob(s) {sorted(bad)}; expected among {GAP_KNOBS}")
    out = {k: WITHIN_CLASS if k == "within_class" else 1.0 for k in GAP_KNOBS}
    out.update({k: float(v) for k, v in knobs.items()})
    for k, v in out.items():
        hi = knob_top(k)
        if not 0.0 <= v <= hi + 1e-9:
            raise ValueError(f"ToyStreets knob {k}={v} must lie in [0, {hi:.4g}]")
    return out


def domain_params(domain: str, appearance_gap: float = 1.0, content_gap: float = 1.0,
                  **knobs) -> dict:  # fmt: skip
    """All knobs of one domain; the "city" values move from the game's (gap 0) to its own (1).

    ``appearance_gap`` and ``content_gap`` scale the whole of each gap; ``knobs`` (see
    ``gap_knobs``) scale its parts on top: a part's city value is
    lerp(game, city, strength x gap x part)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if not (0.0 <= appearance_gap <= 1.0 and 0.0 <= content_gap <= 1.0):
        raise ValueError("appearance_gap and content_gap must lie in [0, 1]")
    g = gap_knobs(**knobs)
    city = domain == "city"
    a = float(appearance_gap) if city else 0.0
    c = float(content_gap) if city else 0.0
    a_part = {k: min(APPEARANCE_STRENGTH[k] * a * g[f"{k}_gap"], 1.0)  # 1 = the extreme look
              for k in APPEARANCE_PARTS}  # fmt: skip
    c_part = {k: c * g[f"{k}_gap"] for k in CONTENT_PARTS}
    part_of = {key: part for part, keys in (*APPEARANCE_PARTS.items(), *CONTENT_PARTS.items())
               for key in keys}  # fmt: skip
    ac = a_part["colour"]
    mat = {k: _lerp(np.array(gm, float), np.array(t, float), ac) for k, (gm, t) in _MATERIALS.items()}  # fmt: skip
    look = {
        k: _lerp(
            np.asarray(_LOOK["game"][k], float),
            np.asarray(_LOOK["city"][k], float),
            a_part[part_of[k]],
        )  # fmt: skip
        for k in _LOOK["game"]
    }
    content = {k: _lerp(_CONTENT["game"][k], _CONTENT["city"][k], c_part[part_of[k]])
               for k in _CONTENT["game"]}  # fmt: skip
    at = a_part["texture"]
    return dict(
        materials=mat,
        cars=_lerp(_CAR_PAINTS["game"], _CAR_PAINTS["city"], ac).astype(float),
        clothes=_lerp(_CLOTHES["game"], _CLOTHES["city"], ac).astype(float),
        tex_fine=_lerp(_TEX_FINE["game"], _TEX_FINE["city"], at),
        tex_blob=_lerp(_TEX_BLOB["game"], _TEX_BLOB["city"], at),
        look=look,
        content=content,
        hue=g["within_class"] * float(appearance_gap) if city else 0.0,
    )


class _Canvas:
    """An RGB float image (0..255) and a train-id map drawn into with masks (bbox-limited)."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.rgb = np.zeros((h, w, 3), np.float32)
        self.lab = np.full((h, w), NONE, np.uint8)

    def _box(self, x0, y0, x1, y1):
        """Integer pixel box covering [x0, x1) x [y0, y1), clipped; None if empty."""
        i0, i1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        j0, j1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        if i0 >= i1 or j0 >= j1:
            return None
        yy = np.arange(i0, i1, dtype=np.float32)[:, None] + 0.5  # pixel centres
        xx = np.arange(j0, j1, dtype=np.float32)[None, :] + 0.5
        return (slice(i0, i1), slice(j0, j1)), yy, xx

    def paint(self, sl, mask, cls, color):
        """Write ``cls`` (or an (h, w) map) and ``color`` (RGB, or (h, w, 3)) where ``mask``."""
        lab, rgb = self.lab[sl], self.rgb[sl]
        lab[mask] = cls if np.ndim(cls) == 0 else cls[mask]
        rgb[mask] = color if np.ndim(color) == 1 else color[mask]

    def rect(self, x0, y0, x1, y1, cls, color, min_w=1.0):
        if x1 - x0 < min_w:  # keep thin things (poles) at least one pixel wide
            cx = 0.5 * (x0 + x1)
            x0, x1 = cx - 0.5 * min_w, cx + 0.5 * min_w
        b = self._box(x0, y0, x1, y1)
        if b is not None:
            sl, yy, xx = b
            self.paint(sl, (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1), cls, color)

    def ellipse(self, cx, cy, rx, ry, cls, color, inner=0.0):
        """Filled ellipse, or a ring when ``inner`` (a fraction of the radii) is > 0."""
        rx, ry = max(rx, 0.6), max(ry, 0.6)
        b = self._box(cx - rx, cy - ry, cx + rx, cy + ry)
        if b is not None:
            sl, yy, xx = b
            r2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2  # (h, w) normalised radius^2
            self.paint(sl, (r2 <= 1.0) & (r2 >= inner**2), cls, color)

    def poly(self, pts, cls, color):
        """Filled convex polygon."""
        out = self.poly_mask(pts)
        if out is not None:
            self.paint(out[0], out[1], cls, color)

    def poly_mask(self, pts):
        """Convex polygon mask: the intersection of the half-planes inside each edge."""
        pts = np.asarray(pts, np.float32)
        b = self._box(*pts.min(0), *pts.max(0))
        if b is None:
            return None
        sl, yy, xx = b
        area = np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
        sign = 1.0 if area >= 0 else -1.0
        mask = np.ones(np.broadcast_shapes(yy.shape, xx.shape), bool)
        for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0)):
            mask &= sign * ((xb - xa) * (yy - ya) - (yb - ya) * (xx - xa)) >= 0  # cross product
        return sl, mask, yy, xx


class _Camera:
    """Pinhole camera: world (X right, h up, z forward) metres -> pixels."""

    def __init__(self, h: int, w: int, content: dict, rng: np.random.Generator):
        self.y_h = content["horizon"] * h + rng.normal(0, 0.03 * h)  # horizon row
        self.v_x = 0.5 * w + rng.normal(0, 0.06 * w)  # vanishing point column
        self.f = content["focal"] * w
        self.cam_h = content["cam_h"]

    def x(self, X, z):
        return self.v_x + self.f * X / z  # x = v_x + f X / z

    def y(self, hgt, z):
        return self.y_h + self.f * (self.cam_h - hgt) / z  # y = y_h + f (cam_h - h) / z


def _jit(rng, p, color, amount=0.12):
    """``color`` x a random brightness in [1 - amount, 1 + amount]; with ``p["hue"]`` > 0 also
    each channel x its own factor in [1 - hue, 1 + hue]: objects of one class get different
    colours (within-class variation). No extra random draw when hue is 0."""
    c = np.asarray(color, float) * rng.uniform(1 - amount, 1 + amount)
    if p["hue"] > 0:
        c = c * rng.uniform(1 - p["hue"], 1 + p["hue"], 3)
    return np.clip(c, 0, 255)


def _facade(cv, cam, side, X, z1, z2, h, cls, color, rng, pattern=None, alt=None):
    """A vertical wall parallel to the street at lateral ``side * X`` from depth z1 to z2.

    ``pattern``: "windows" (a grid of ``alt``-coloured windows) or "lattice" (fence slats:
    the holes are not painted).
    """
    pts = [(cam.x(side * X, z1), cam.y(0, z1)), (cam.x(side * X, z1), cam.y(h, z1)),
           (cam.x(side * X, z2), cam.y(h, z2)), (cam.x(side * X, z2), cam.y(0, z2))]  # fmt: skip
    out = cv.poly_mask(pts)
    if out is None:
        return
    sl, mask, yy, xx = out
    dx = np.where(np.abs(xx - cam.v_x) < 1e-3, 1e-3, xx - cam.v_x)
    z = side * cam.f * X / dx  # depth of the facade seen through column x
    v = cam.cam_h - (yy - cam.y_h) * z / cam.f  # height above the ground of that facade point
    col = np.broadcast_to(np.asarray(color, np.float32), mask.shape + (3,)).copy()
    if pattern == "windows":
        win = (np.mod(z, 3.0) > 1.0) & (np.mod(v, 3.2) > 1.2) & (v > 3.0) & (v < h - 1.0)
        col[np.broadcast_to(win, mask.shape)] = alt
    elif pattern == "lattice":
        mask = mask & ((np.mod(z, 0.7) < 0.25) | (np.mod(v, 0.6) < 0.2) | (v > h - 0.2))
    cv.paint(sl, mask, cls, col)


def _person(cv, cam, X, z, cls, p, rng, seated_h=0.0, height=1.75):
    """Frontal person: legs, torso, arms, head. ``seated_h`` lifts a rider onto a saddle."""
    m, s = p["materials"], cam.f / z
    cloth, legs = p["clothes"][rng.integers(len(p["clothes"]))], _jit(rng, p, (50, 50, 70))
    hgt = height * rng.uniform(0.9, 1.1)
    cx, yg = cam.x(X, z), cam.y(seated_h, z)
    if seated_h == 0:
        for dx in (-0.1, 0.1):
            cv.rect(cx + (dx - 0.07) * s, yg - 0.5 * hgt * s, cx + (dx + 0.07) * s, yg, cls, legs)
    cv.rect(cx - 0.2 * s, yg - 0.82 * hgt * s, cx + 0.2 * s, yg - 0.48 * hgt * s, cls, cloth)
    for dx in (-0.26, 0.26):
        cv.rect(cx + (dx - 0.05) * s, yg - 0.8 * hgt * s, cx + (dx + 0.05) * s, yg - 0.5 * hgt * s, cls, cloth)  # fmt: skip
    cv.ellipse(cx, yg - 0.91 * hgt * s, 0.11 * s, 0.13 * s, cls, _jit(rng, p, m["skin"]))


def _two_wheeler(cv, cam, X, z, cls, p, rng):
    """Side view of a bicycle (rings and a frame) or a motorcycle (solid wheels and a body)."""
    m, s = p["materials"], cam.f / z
    cx, yg = cam.x(X, z), cam.y(0, z)
    r = (0.34 if cls == BIKE else 0.32) * s
    for dx in (-0.55, 0.55):
        if cls == BIKE:
            cv.ellipse(cx + dx * s, yg - r, r, r, cls, m["tyre"], inner=0.75)
        else:
            cv.ellipse(cx + dx * s, yg - r, r, r, cls, m["tyre"])
    color = _jit(rng, p, m["bike" if cls == BIKE else "moto"])
    if cls == BIKE:
        a, b, c = (cx - 0.55 * s, yg - r), (cx + 0.05 * s, yg - r), (cx - 0.1 * s, yg - 0.85 * s)
        cv.poly([a, b, c], cls, color)
        cv.rect(cx + 0.4 * s, yg - 0.95 * s, cx + 0.5 * s, yg - r, cls, color)
    else:
        cv.ellipse(cx, yg - 0.65 * s, 0.55 * s, 0.25 * s, cls, color)
        cv.rect(cx + 0.35 * s, yg - 1.0 * s, cx + 0.45 * s, yg - 0.5 * s, cls, color)


def _vehicle(cv, cam, X, z, cls, p, rng, side_view=False, length=None):
    """Car, truck, bus or train from behind (``side_view=False``) or from the side."""
    m, s, sc = p["materials"], cam.f / z, p["content"]["car_scale"]
    if cls == CAR:
        paint = _jit(rng, p, p["cars"][rng.integers(len(p["cars"]))])
    else:
        paint = _jit(rng, p, m[{TRUCK: "truck", BUS: "bus", TRAIN: "train"}[cls]])
    wdt = {CAR: 1.8, TRUCK: 2.5, BUS: 2.55, TRAIN: 3.0}[cls] * sc
    hgt = {CAR: 1.5, TRUCK: 3.6, BUS: 3.2, TRAIN: 4.0}[cls] * sc
    length = length or {CAR: 4.3, TRUCK: 8.0, BUS: 11.0, TRAIN: 40.0}[cls] * sc
    half = 0.5 * (length if side_view else wdt)
    cx, yg = cam.x(X, z), cam.y(0, z)
    x0, x1 = cx - half * s, cx + half * s
    if not side_view:  # shadow on the ground under the vehicle, then the wheels
        cv.rgb[max(int(yg - 0.2 * s), 0) : max(int(yg + 0.1 * s), 0), max(int(x0), 0) : max(int(x1), 0)] *= 0.6  # fmt: skip
    wheel_x = [x0 + 0.12 * wdt * s, x1 - 0.27 * wdt * s] if not side_view else [
        x0 + 0.18 * length * s, x1 - 0.18 * length * s]  # fmt: skip
    for wx in wheel_x:
        if side_view:
            cv.ellipse(wx, yg - 0.38 * s, 0.38 * s, 0.38 * s, cls, m["tyre"])
        else:
            cv.rect(wx, yg - 0.45 * s, wx + 0.15 * wdt * s, yg, cls, m["tyre"])
    if cls == CAR:
        cv.rect(x0, yg - 0.95 * hgt * s * 0.66, x1, yg - 0.25 * s, cls, paint)
        top_in = (0.15 if not side_view else 0.25) * (x1 - x0)
        yt, yb = yg - hgt * s, yg - 0.95 * hgt * s * 0.66
        cv.poly([(x0 + 0.05 * (x1 - x0), yb), (x0 + top_in, yt), (x1 - top_in, yt),
                 (x1 - 0.05 * (x1 - x0), yb)], cls, paint)  # fmt: skip
        cv.poly([(x0 + 0.12 * (x1 - x0), yb), (x0 + top_in + 0.04 * (x1 - x0), yt + 0.15 * (yb - yt)),
                 (x1 - top_in - 0.04 * (x1 - x0), yt + 0.15 * (yb - yt)), (x1 - 0.12 * (x1 - x0), yb)],
                cls, m["glass"])  # fmt: skip
        if not side_view:
            for lx in (x0, x1 - 0.12 * (x1 - x0)):
                cv.rect(lx, yb + 0.1 * s, lx + 0.12 * (x1 - x0), yb + 0.25 * s, cls, (200, 20, 20))
        return
    yt = yg - hgt * s
    if cls == TRUCK and side_view:  # tall box with a separate, lower cab in front
        cv.rect(x0, yt, x0 + 0.72 * (x1 - x0), yg - 0.5 * s, cls, paint)
        cv.rect(x0 + 0.75 * (x1 - x0), yt + 0.8 * s, x1, yg - 0.4 * s, cls, paint * 0.8)
        cv.rect(x0 + 0.82 * (x1 - x0), yt + 1.0 * s, x1 - 0.02 * (x1 - x0), yt + 1.8 * s, cls, m["glass"])  # fmt: skip
        return
    cv.rect(x0, yt, x1, yg - 0.35 * s, cls, paint)
    if cls == TRUCK:  # rear doors: two dark vertical seams
        for fx in (0.33, 0.66):
            cv.rect(x0 + fx * (x1 - x0), yt, x0 + fx * (x1 - x0) + 0.06 * s, yg - 0.4 * s, cls, paint * 0.5)  # fmt: skip
    else:  # bus / train: a band of windows
        n = max(int((x1 - x0) / (1.4 * s)), 1) if side_view else 1
        wx = np.linspace(x0, x1, n + 1)
        for a, b in zip(wx[:-1], wx[1:]):
            cv.rect(a + 0.15 * (b - a), yt + 0.3 * hgt * s * 0.3, b - 0.15 * (b - a), yt + 0.45 * hgt * s, cls, m["glass"])  # fmt: skip


def _draw_layout(cv, cam, p, rng):
    """Sky, ground (road, lane marks, sidewalks, terrain) and the side structures."""
    m, c, h, w = p["materials"], p["content"], cv.h, cv.w
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    sky = (yy < cam.y_h) & (xx >= 0)
    sky_col = (
        m["sky"] * (0.8 + 0.3 * np.clip(yy / max(cam.y_h, 1), 0, 1))[..., None]
    )  # brighter low
    cv.paint(np.s_[:, :], sky, SKY, np.broadcast_to(sky_col, (h, w, 3)))
    dy = np.maximum(yy - cam.y_h, 1e-3)
    X = (xx - cam.v_x) * cam.cam_h / dy  # lateral ground coordinate of each pixel (metres)
    z = cam.f * cam.cam_h / dy  # depth of each ground pixel
    ground = ~sky
    road_half = 0.5 * c["road_w"] * rng.uniform(0.85, 1.15)
    sw = c["sidewalk_w"] * rng.uniform(0.7, 1.3)
    terrain = {s: rng.random() < c["p_terrain"] for s in (-1, 1)}
    ter_w = {s: rng.uniform(2.0, 6.0) if terrain[s] else 0.0 for s in (-1, 1)}
    side = np.where(X < 0, -1, 1)
    a = np.abs(X)
    outer_ter = np.where(side < 0, ter_w[-1], ter_w[1])
    cls = np.where(a < road_half, ROAD, np.where(a < road_half + sw, SIDEWALK, TERRAIN))
    cls = np.where((a >= road_half + sw + outer_ter) & (cls == TERRAIN), SIDEWALK, cls)
    mat = np.stack([m["road"], m["sidewalk"], m["terrain"]]).astype(np.float32)
    idx = np.where(cls == ROAD, 0, np.where(cls == SIDEWALK, 1, 2))
    col = mat[idx]  # (H, W, 3)
    lane = (cls == ROAD) & (np.abs(np.abs(X) - road_half * rng.choice([0.0, 0.5])) < 0.12)
    col[lane & (np.mod(z, 8.0) < 4.0)] = m["lane"]
    col[(cls == SIDEWALK) & (np.abs(a - road_half) < 0.2)] *= 0.75  # kerb
    cv.paint(np.s_[:, :], ground, cls.astype(np.uint8), col)
    # side structures, far (large |X|) first: buildings, then hedges / walls / fences
    for s in (-1, 1):
        xb = road_half + sw + ter_w[s] + rng.uniform(0.0, 2.0)
        z0 = rng.uniform(2.0, 6.0)
        while z0 < 160:
            length = rng.uniform(8, 30)
            if rng.random() < 0.85:
                hb = c["building_h"] * rng.uniform(0.5, 1.6)
                _facade(cv, cam, s, xb + rng.uniform(0, 1.5), z0, z0 + length, hb, BUILDING,
                        _jit(rng, p, m["building"], 0.2), rng, "windows", _jit(rng, p, m["window"]))  # fmt: skip
            elif rng.random() < 0.7:  # a park: a row of big trees instead of a building
                _facade(cv, cam, s, xb, z0, z0 + length, rng.uniform(5, 10), VEG, _jit(rng, p, m["veg"]), rng)  # fmt: skip
            z0 += length + rng.uniform(0, 6) * (rng.random() < 0.3)
        xw = road_half + sw + 0.5 * ter_w[s]
        z0 = rng.uniform(3.0, 20.0)
        for kind, prob in ((WALL, c["p_wall"]), (FENCE, c["p_fence"]), (VEG, 0.3)):
            if rng.random() < prob:
                z1 = z0 + rng.uniform(5, 40)
                hw = {WALL: rng.uniform(1.0, 2.5), FENCE: rng.uniform(1.0, 2.0), VEG: 1.2}[kind]
                name = {WALL: "wall", FENCE: "fence", VEG: "veg"}[kind]
                pat = "lattice" if kind == FENCE else None
                _facade(cv, cam, s, xw, z0, z1, hw, kind, _jit(rng, p, m[name]), rng, pat)
                z0 = z1 + rng.uniform(0, 10)
    return road_half, sw, ter_w


def _draw_objects(cv, cam, p, rng, road_half, sw, ter_w):
    """Poles, trees, vehicles, people and two-wheelers, drawn far to near (painter's order)."""
    m, c = p["materials"], p["content"]
    objs = []  # (z, kind, X)
    for _ in range(rng.poisson(c["n_poles"])):
        s = rng.choice([-1, 1])
        objs.append((rng.uniform(4, 60), "pole", s * (road_half + rng.uniform(0.3, 0.8))))
    for _ in range(rng.poisson(c["n_trees"])):
        s = rng.choice([-1, 1])
        objs.append((rng.uniform(5, 70), "tree", s * (road_half + sw - 0.6 + 0.5 * ter_w[s])))
    for kind, n in ((CAR, c["n_cars"]), (TRUCK, c["n_trucks"]), (BUS, c["n_buses"])):
        for _ in range(rng.poisson(n)):
            objs.append((rng.uniform(5, 60), kind, rng.uniform(-road_half + 1.2, road_half - 1.2)))
    for _ in range(rng.poisson(c["n_persons"])):
        s = rng.choice([-1, 1])
        X = s * (road_half + rng.uniform(0.3, sw)) if rng.random() < 0.85 else rng.uniform(-road_half, road_half)  # fmt: skip
        objs.append((rng.uniform(3, 35), PERSON, X))
    for _ in range(rng.poisson(c["n_riders"])):
        objs.append((rng.uniform(4, 30), "rider", rng.uniform(-road_half + 0.8, road_half - 0.8)))
    for _ in range(rng.poisson(c["n_bikes"])):
        s = rng.choice([-1, 1])
        objs.append((rng.uniform(3, 25), BIKE, s * (road_half + rng.uniform(0.4, sw))))
    if rng.random() < c["p_train"]:
        objs.append((rng.uniform(18, 40), TRAIN, 0.0))
    if rng.random() < 0.3:  # unlabeled street furniture (a bin or a box): label id 0
        objs.append((rng.uniform(4, 30), "clutter", rng.choice([-1, 1]) * (road_half + 0.6)))
    for z, kind, X in sorted(objs, key=lambda o: -o[0]):
        s = cam.f / z
        if kind == "pole":
            top = rng.uniform(4.0, 7.0)
            px, py = cam.x(X, z), cam.y(0, z)
            cv.rect(px - 0.08 * s, py - top * s, px + 0.08 * s, py, POLE, _jit(rng, p, m["pole"]))
            u = rng.random()
            if u < 0.45:  # traffic light: a box with three lamps, hanging towards the road
                lx = px - np.sign(X) * 0.3 * s
                cv.rect(lx - 0.2 * s, py - top * s, lx + 0.2 * s, py - (top - 1.0) * s, LIGHT, _jit(rng, p, m["light"]))  # fmt: skip
                for k, lamp in enumerate(((230, 30, 30), (240, 200, 0), (30, 220, 60))):
                    cv.ellipse(lx, py - (top - 0.17 - 0.32 * k) * s, 0.1 * s, 0.1 * s, LIGHT, lamp)
            elif u < 0.9:  # traffic sign: a disc, a triangle or a plate at 2.5 m
                sy, r = py - 2.6 * s, 0.35 * s
                col = _jit(rng, p, m["sign"])
                v = rng.random()
                if v < 0.4:
                    cv.ellipse(px, sy, r, r, SIGN, col)
                elif v < 0.7:
                    cv.poly([(px - r, sy + r), (px + r, sy + r), (px, sy - r)], SIGN, col)
                else:
                    cv.rect(px - 1.3 * r, sy - r, px + 1.3 * r, sy + r, SIGN, col)
        elif kind == "tree":
            th = rng.uniform(2.0, 3.5)
            px, py = cam.x(X, z), cam.y(0, z)
            cv.rect(
                px - 0.15 * s, py - th * s, px + 0.15 * s, py, VEG, _jit(rng, p, m["veg"]) * 0.55
            )
            for _ in range(rng.integers(2, 4)):
                r = rng.uniform(1.3, 2.4) * s
                cv.ellipse(px + rng.uniform(-0.8, 0.8) * s, py - (th + 0.8) * s - rng.uniform(0, 1) * s, r, 0.9 * r, VEG, _jit(rng, p, m["veg"]))  # fmt: skip
        elif kind in (CAR, TRUCK, BUS):
            _vehicle(cv, cam, X, z, kind, p, rng, side_view=rng.random() < 0.25)
        elif kind == TRAIN:  # crossing the street on a level crossing, seen from the side
            op = road_half + sw  # only the street opening: the buildings hide the rest
            cv.rect(cam.x(-op, z), cam.y(0.15, z), cam.x(op, z), cam.y(0, z), NONE, (70, 60, 50))
            _vehicle(cv, cam, 0.0, z, TRAIN, p, rng, side_view=True, length=2 * op)
        elif kind == PERSON:
            _person(cv, cam, X, z, PERSON, p, rng)
        elif kind == BIKE:
            _two_wheeler(cv, cam, X, z, MOTO if rng.random() < 0.15 else BIKE, p, rng)
        elif kind == "rider":
            vehicle = MOTO if rng.random() < c["p_moto"] else BIKE
            _two_wheeler(cv, cam, X, z, vehicle, p, rng)
            _person(cv, cam, X, z, RIDER, p, rng, seated_h=0.55, height=1.6)
            cv.rect(cam.x(X - 0.1, z), cam.y(0.95, z), cam.x(X + 0.1, z), cam.y(0.15, z), RIDER, _jit(rng, p, (50, 50, 70)))  # fmt: skip
        elif kind == "clutter":
            px, py = cam.x(X, z), cam.y(0, z)
            cv.rect(px - 0.3 * s, py - 1.0 * s, px + 0.3 * s, py, NONE, _jit(rng, p, m["clutter"]))


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication. Shape: (H, W, 3) -> (H, W, 3)."""
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(pad[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _finish(cv, cam, p, rng) -> np.ndarray:
    """Textures, lighting, saturation/contrast/gamma, colour cast, blur, vignette, noise."""
    h, w, look = cv.h, cv.w, p["look"]
    img = cv.rgb / 255.0
    lab = cv.lab
    fine = rng.standard_normal((h, w)).astype(np.float32)
    coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32)
    iy, ix = np.arange(h) / 8.0, np.arange(w) / 8.0  # bilinear upsampling of the coarse grid
    y0, x0 = iy.astype(int), ix.astype(int)
    fy, fx = (iy - y0)[:, None].astype(np.float32), (ix - x0)[None, :].astype(np.float32)
    blob = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
            + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)  # fmt: skip
    amp_f, amp_b = np.zeros(256, np.float32), np.zeros(256, np.float32)
    amp_f[:NUM_CLASSES], amp_b[:NUM_CLASSES] = p["tex_fine"], p["tex_blob"]
    img *= (1.0 + amp_f[lab] * fine + amp_b[lab] * blob)[..., None]  # per-class texture
    # lighting: a sun from one side (bright facades on one side, a shadow band on the road)
    xx = (np.arange(w, dtype=np.float32) + 0.5) / w
    sun_side = rng.choice([-1.0, 1.0])
    img *= (1.0 + look["sun"] * sun_side * (xx - 0.5))[None, :, None]
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    X = (xx[None, :] * w - cam.v_x) * cam.cam_h / np.maximum(yy - cam.y_h, 1e-3)
    shadow_edge = rng.uniform(-2.0, 3.0)
    in_shadow = (yy > cam.y_h) & (sun_side * X < -shadow_edge) & np.isin(lab, (ROAD, SIDEWALK, TERRAIN))  # fmt: skip
    img[in_shadow] *= 1.0 - look["shadow"]
    grey = img.mean(-1, keepdims=True)
    img = grey + look["sat"] * (img - grey)  # saturation
    img = 0.5 + look["contrast"] * (img - 0.5)  # contrast around mid-grey
    img = np.clip(img, 0, 1) ** look["gamma"] * look["cast"]  # gamma, colour cast
    if look["blur"] > 0:
        img = (1 - look["blur"]) * img + look["blur"] * _box_blur(img)
    if look["vignette"] > 0:
        r2 = ((yy / h - 0.5) ** 2 + (xx[None, :] - 0.5) ** 2) / 0.5  # 0 centre .. 1 corners
        img *= (1.0 - look["vignette"] * r2)[..., None]
    if look["noise"] > 0:
        img += look["noise"] * rng.standard_normal(img.shape).astype(np.float32)  # sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_scene(
    rng: np.random.Generator,
    domain: str,
    appearance_gap: float = 1.0,
    content_gap: float = 1.0,
    height: int = 128,
    width: int = 256,
    **knobs,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene of ``domain`` ("game" = source, "city" = target); ``knobs``: the
    gap's parts (``gap_knobs``).

    Shape: -> rgb uint8 (height, width, 3), label ids uint8 (height, width); pixels of no class
    get label id 0 ("unlabeled"); the city's ego-car bonnet gets label id 1 ("ego vehicle").
    """
    p = domain_params(domain, appearance_gap, content_gap, **knobs)
    cv = _Canvas(height, width)
    cam = _Camera(height, width, p["content"], rng)
    road_half, sw, ter_w = _draw_layout(cv, cam, p, rng)
    _draw_objects(cv, cam, p, rng, road_half, sw, ter_w)
    rgb = _finish(cv, cam, p, rng)
    lut = np.zeros(256, np.uint8)  # train id -> Cityscapes label id; NONE -> 0
    lut[:NUM_CLASSES] = LABEL_ID_OF_TRAIN_ID
    labels = lut[cv.lab]
    hood = p["content"]["hood"]
    if hood > 0:  # the ego car's bonnet at the bottom (Cityscapes labels it "ego vehicle")
        yy = np.arange(height)[:, None] + 0.5
        xx = (np.arange(width)[None, :] + 0.5) / width - 0.5
        bonnet = yy > height * (1 - hood * (1 - 1.5 * xx**2))
        labels[bonnet] = 1
        rgb[bonnet] = (rgb[bonnet] * 0.3 + 20).astype(np.uint8)
    return rgb, labels


# ---- writing the benchmark in the official GTA5 / Cityscapes layouts -----------------------
_SPLITS = (("game", "train"), ("city", "train"), ("city", "val"))


def scene_seed(seed: int, domain: str, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one image: a function of (seed, domain, split, index) only."""
    return np.random.SeedSequence([seed, DOMAINS.index(domain), ("train", "val").index(split), index])  # fmt: skip


def _paths(out: Path, domain: str, split: str, i: int) -> tuple[Path, Path]:
    if domain == "game":
        return out / "gta5" / "images" / f"{i:05d}.png", out / "gta5" / "labels" / f"{i:05d}.png"
    name = f"toycity_{i:06d}_000000"
    cs = out / "cityscapes"
    return (cs / "leftImg8bit" / split / "toycity" / f"{name}_leftImg8bit.png",
            cs / "gtFine" / split / "toycity" / f"{name}_gtFine_labelIds.png")  # fmt: skip


_GTA_PALETTE = np.zeros((256, 3), np.uint8)  # a palette PNG like GTA5's: index = label id
_GTA_PALETTE[LABEL_ID_OF_TRAIN_ID] = PALETTE


def _write_one(job) -> np.ndarray:
    """Render and write one image; returns its label-id histogram (256,)."""
    out, domain, split, i, seed, a_gap, c_gap, h, w, knobs = job
    rng = np.random.default_rng(scene_seed(seed, domain, split, i))
    rgb, ids = render_scene(rng, domain, a_gap, c_gap, h, w, **knobs)
    img_path, lab_path = _paths(Path(out), domain, split, i)
    Image.fromarray(rgb).save(img_path)
    if domain == "game":
        lab = Image.fromarray(ids, mode="P")
        lab.putpalette(_GTA_PALETTE.ravel().tolist())
    else:
        lab = Image.fromarray(ids, mode="L")
    lab.save(lab_path)
    return np.bincount(ids.ravel(), minlength=256)


def write_toystreets(out, n_source=2000, n_target_train=1000, n_target_val=300, height=128,
                     width=256, seed=0, appearance_gap=1.0, content_gap=1.0, progress=True,
                     workers=None, **knobs) -> dict:  # fmt: skip
    """Write ToyStreets as ``out/gta5`` (source) and ``out/cityscapes`` (target train/val).

    ``knobs``: the gap's parts (``gap_knobs``: ``colour_gap`` ... ``within_class``), recorded in
    the summary with their defaults.

    Byte-identical output for the same arguments, whatever the number of ``workers``
    (default: all CPU cores). Returns (and writes to ``out/toystreets.json``) a summary with the
    parameters, the image counts and the label-id pixel histogram per split.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    knobs = gap_knobs(**knobs)
    counts = {("game", "train"): n_source, ("city", "train"): n_target_train,
              ("city", "val"): n_target_val}  # fmt: skip
    jobs = []
    for (domain, split), n in counts.items():
        for i in range(n):
            jobs.append((str(out), domain, split, i, seed, appearance_gap, content_gap, height, width, knobs))  # fmt: skip
        for p in _paths(out, domain, split, 0):
            p.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="ToyStreets", disable=not progress)
    if workers > 1 and len(jobs) > 16:
        with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
            hists = []
            for hist in pool.imap(_write_one, jobs, chunksize=8):  # ordered, deterministic
                hists.append(hist)
                bar.update()
    else:
        hists = []
        for job in jobs:
            hists.append(_write_one(job))
            bar.update()
    bar.close()
    summary = dict(
        version=VERSION, seed=seed, height=height, width=width, appearance_gap=appearance_gap,
        content_gap=content_gap, **knobs, n_source=n_source, n_target_train=n_target_train,
        n_target_val=n_target_val, label_id_pixels={},
    )  # fmt: skip
    k = 0
    for (domain, split), n in counts.items():
        hist = np.sum(hists[k : k + n], axis=0) if n else np.zeros(256, int)
        summary["label_id_pixels"][f"{domain}/{split}"] = {
            int(i): int(v) for i, v in enumerate(hist) if v
        }
        k += n
    (out / "toystreets.json").write_text(json.dumps(summary, indent=1))
    return summary


def class_frequencies(label_ids: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Share of each train class among the labelled pixels. Shape: label-id maps -> (19,)."""
    from .labels import id_to_train_id

    hist = np.zeros(256)
    for ids in label_ids:
        hist += np.bincount(id_to_train_id(np.asarray(ids)).ravel(), minlength=256)
    return hist[:NUM_CLASSES] / max(hist[:NUM_CLASSES].sum(), 1)


def class_colour_stats(images, label_ids) -> np.ndarray:
    """Mean RGB (0..1) of each train class over the images; NaN where a class is absent.

    Shape: images (N, H, W, 3) uint8, label ids (N, H, W) -> (19, 3).
    """
    from .labels import id_to_train_id

    sums, n = np.zeros((NUM_CLASSES, 3)), np.zeros(NUM_CLASSES)
    for img, ids in zip(images, label_ids):
        tid = id_to_train_id(np.asarray(ids)).ravel()
        keep = tid < NUM_CLASSES
        rgb = np.asarray(img, np.float64).reshape(-1, 3)[keep] / 255.0
        n += np.bincount(tid[keep], minlength=NUM_CLASSES)
        for ch in range(3):
            sums[:, ch] += np.bincount(tid[keep], weights=rgb[:, ch], minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / n[:, None]


def sample_scenes(domain, n, seed=0, appearance_gap=1.0, content_gap=1.0, height=64, width=128,
                  **knobs):  # fmt: skip
    """Render ``n`` scenes in memory (``knobs``: ``gap_knobs``).
    Shape: -> images (n, H, W, 3) uint8, label ids (n, H, W)."""
    imgs, labs = [], []
    for i in range(n):
        rng = np.random.default_rng(scene_seed(seed, domain, "train", i))
        rgb, ids = render_scene(rng, domain, appearance_gap, content_gap, height, width, **knobs)
        imgs.append(rgb)
        labs.append(ids)
    return np.stack(imgs), np.stack(labs)
