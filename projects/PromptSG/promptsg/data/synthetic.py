"""SyntheticMarket: a procedurally drawn person re-identification dataset.

The dataset is generated on the fly (no download) and laid out exactly like
Market-1501, so FastReID's Market pipeline, the Market evaluation protocol and
any Market-trained tooling apply unchanged::

    <dataset_dir>/bounding_box_train/0001_c3s1_000004_01.jpg   training identities
    <dataset_dir>/query/0151_c1s1_000000_01.jpg                test identities
    <dataset_dir>/bounding_box_test/0151_c4s1_000003_01.jpg    test identities,
                                                               distractors (pid 0000)
                                                               and junk (pid -1)
    <dataset_dir>/manifest.json                                parameters and counts

File names are ``{pid:04d}_c{cam}s1_{frame:06d}_{idx:02d}.jpg`` with a 1-based
single-digit camera; ``frame`` numbers the images of one identity.

What tells identities apart (fixed per identity):
    upper clothing colour and pattern (solid, horizontal stripes, vertical
    stripes, checks, two-tone) and sleeve length; lower clothing colour and type
    (trousers, shorts, skirt); shoe colour; hair colour and style (short, long,
    cap); skin tone; carried object (backpack, handbag on one side, none) and
    its colour; body height and width.  Colours come from small shared palettes,
    so many identities share a shirt or trouser colour and only the combination
    of attributes identifies a person; some identities are look-alikes of another
    one (same shirt, two other attribute groups changed).

What changes between cameras (fixed per camera, shared by train and test):
    background (solid, wall/floor split, vertical stripes, gradient, tiled
    floor), lighting (gain, white-balance tint, an illumination ramp), the
    preferred viewpoint (front, back, side; a backpack is fully visible only from
    behind), figure scale and position, how often another person occludes the
    target or walks behind it, blur and sensor noise.

What changes between images of one camera: viewpoint, walking direction
(mirror), arm and leg pose, bounding-box jitter, background offsets,
brightness, occluders and noise.

The gallery of every test identity spans at least two cameras, so every query
has a match from a different camera (the Market protocol ignores same-camera
matches).  Distractors (pid 0) are people who are not in the query set, or
background crops with only a distant passer-by; junk images (pid -1) are badly
cropped boxes that FastReID skips when parsing.

Generation is deterministic: every image is drawn from its own random stream
seeded by ``(seed, kind, pid, image index)``, and JPEG parameters are fixed, so
the same parameters give byte-identical files (for a given Pillow/libjpeg
build) regardless of generation order.  The same streams redraw any image's
person as a silhouette mask (:class:`PersonMasks`): the renderer knows where
the person is, which measures where a model looks.

A second generator, :func:`generate_caption_pool`, draws a pool of *other*
identities (their own random streams, none of them a re-ID identity) for
contrastive image-caption pretraining of a small CLIP::

    <pool_dir>/images/00001_000.jpg    image 0 of pool identity 1, any of 12 cameras
    <pool_dir>/captions.json           file name -> caption (:func:`describe_person`)
    <pool_dir>/manifest.json           parameters and counts

Generation is atomic: the dataset is written into a hidden temporary sibling
directory and renamed into place only when complete, with ``manifest.json``
recording the parameters.  A folder is generated only when it is missing: a
later call with the same parameters uses it as it is, with one warning line if
images were added or removed since (a user trying a case; nothing is deleted
or rewritten).  A call with other parameters raises (remove the folder or use
another root); so does a folder written by another generator version, with the
command that rewrites it explicitly (``python -m promptsg.data --regenerate
DIR``).  A directory without our manifest is never touched.
"""

import json
import logging
import os
import os.path as osp
import re
import shutil
import tempfile
import uuid
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset

__all__ = ["PersonMasks", "SyntheticMarket", "describe_person", "generate_caption_pool", "regenerate_dataset",
           "generate_synthetic_market", "identity_captions", "person_words"]

# Bump whenever the drawing or the layout changes: old datasets are then regenerated.
logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# Bump whenever describe_person changes: caption pools are then regenerated.
CAPTION_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
POOL_IMAGE_DIR = "images"
CAPTIONS_NAME = "captions.json"

# Default size: about 2.7k images of 128x64, generated in a few seconds on two CPU
# cores and small enough to train a small CNN on CPU in minutes, while keeping a
# gallery large enough (~830 images) that ranking is not trivial.
DEFAULT_SEED = 0
DEFAULT_NUM_TRAIN_IDS = 150
DEFAULT_NUM_TEST_IDS = 100
DEFAULT_NUM_CAMERAS = 6
DEFAULT_NUM_DISTRACTORS = 200
DEFAULT_NUM_JUNK = 20
DEFAULT_HEIGHT = 128
DEFAULT_WIDTH = 64

TRAIN_IMAGES_PER_ID = (8, 12)      # inclusive range, spread over 2-4 cameras
TRAIN_CAMERAS_PER_ID = (2, 4)
TEST_CAMERAS_PER_ID = (3, 5)       # cameras an identity is seen by at test time
QUERIES_PER_ID = (2, 3)            # one query per camera, from distinct cameras
GALLERY_IMAGES_PER_ID = (5, 7)     # spread over all of the identity's cameras

SUPERSAMPLE = 2                    # draw at 2x and downsample: antialiased edges
JPEG_QUALITY = 90

# The caption pool is seen by the re-ID dataset's cameras (same seed) and as many more, so the
# pretrained image tower does not learn six backgrounds only.
POOL_NUM_CAMERAS = 12

# Random-stream tags: each image's stream depends only on (seed, tag, pid, index).
_TAG_IDENTITY, _TAG_CAMERA, _TAG_PLAN, _TAG_IMAGE, _TAG_DISTRACTOR, _TAG_JUNK = range(1, 7)
_TAG_POOL_IDENTITY, _TAG_POOL_IMAGE = 7, 8   # caption pool: never the re-ID identities' streams

# Shared palettes (RGB).  Few entries on purpose: identities collide on single attributes.
SHIRT_COLOURS = [
    (200, 30, 35), (120, 20, 30), (30, 70, 180), (20, 30, 80), (110, 170, 225),
    (40, 140, 60), (20, 75, 40), (230, 200, 40), (235, 235, 230), (30, 30, 32),
    (130, 130, 135), (235, 140, 175), (240, 130, 30), (110, 50, 140), (120, 80, 45),
    (210, 190, 150),
]
LOWER_COLOURS = [
    (25, 25, 28), (40, 60, 110), (70, 100, 150), (110, 110, 115), (190, 170, 125),
    (100, 70, 45), (230, 230, 225), (45, 70, 45), (150, 30, 40),
]
SHOE_COLOURS = [(20, 20, 20), (240, 240, 240), (110, 70, 40), (120, 120, 125), (200, 40, 40), (40, 60, 150)]
HAIR_COLOURS = [(20, 15, 12), (60, 40, 25), (110, 75, 40), (210, 180, 110), (160, 160, 160)]
SKIN_TONES = [(250, 215, 190), (235, 190, 155), (200, 150, 110), (150, 100, 70), (95, 65, 45)]
BAG_COLOURS = [(25, 25, 25), (60, 60, 70), (140, 40, 40), (40, 60, 130), (120, 90, 50), (200, 200, 190), (60, 110, 60)]
# Caption words of the palette entries, in palette order: common colour names.
SHIRT_COLOUR_NAMES = ("red", "dark red", "blue", "navy", "light blue", "green", "dark green", "yellow",
                      "white", "black", "grey", "pink", "orange", "purple", "brown", "beige")
LOWER_COLOUR_NAMES = ("black", "dark blue", "blue", "grey", "beige", "brown", "white", "dark green", "red")
SHOE_COLOUR_NAMES = ("black", "white", "brown", "grey", "red", "blue")
HAIR_COLOUR_NAMES = ("black", "dark brown", "brown", "blond", "grey")
BAG_COLOUR_NAMES = ("black", "dark grey", "red", "blue", "brown", "white", "green")
BACKGROUND_COLOURS = [
    (150, 150, 150), (185, 175, 160), (110, 115, 125), (90, 100, 80), (200, 195, 185),
    (160, 130, 100), (70, 75, 85), (130, 150, 165), (175, 160, 140), (100, 90, 80),
]

# Look-alikes: probability that an identity copies an earlier one and visibly
# changes two of these attribute groups (the shirt colour and pattern are kept).
LOOKALIKE_PROB = 0.4
LOOKALIKE_GROUPS = {
    "lower": ("lower", "lower_type"),
    "shoes": ("shoes",),
    "hair": ("hair", "hair_style", "cap"),
    "bag": ("bag", "bag_colour", "bag_side"),
    "body": ("height", "width", "skin"),
    "sleeves": ("long_sleeves", "shirt2"),
}

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "twotone")
VIEWS = ("front", "back", "side")
BACKGROUNDS = ("solid", "wall_floor", "stripes", "gradient", "tiles")

# Camera-to-camera photometric change: gain range and white-balance spread (per channel +-).
CAMERA_GAIN = (0.8, 1.2)
CAMERA_TINT = 0.1

_NAME_RE = re.compile(r"^([-\d]+)_c(\d)s1_\d+_\d+\.jpg$")


# ----------------------------------------------------------------------------
# Random attributes
# ----------------------------------------------------------------------------

def _rng(*key):
    return np.random.default_rng([int(k) for k in key])


def _jitter(rng, colour, amount):
    """A palette colour with a small per-identity shift, so shared colours are close, not equal."""
    c = np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _pick(rng, palette, exclude=None):
    choices = [c for c in palette if c != exclude]
    return choices[rng.integers(len(choices))]


def _sample_person(rng):
    """Appearance of one person; everything that stays fixed across that person's images."""
    shirt = _pick(rng, SHIRT_COLOURS)
    lower_type = rng.choice(["trousers", "shorts", "skirt"], p=[0.6, 0.2, 0.2])
    bag = rng.choice(["none", "backpack", "handbag"], p=[0.45, 0.3, 0.25])
    hair_style = rng.choice(["short", "long", "cap"], p=[0.55, 0.3, 0.15])
    return {
        "shirt": _jitter(rng, shirt, 12),
        "shirt2": _jitter(rng, _pick(rng, SHIRT_COLOURS, exclude=shirt), 12),
        "pattern": PATTERNS[rng.integers(len(PATTERNS))],
        "stripe_period": float(rng.uniform(0.035, 0.07)),   # in figure heights
        "long_sleeves": bool(rng.random() < 0.5),
        "lower": _jitter(rng, _pick(rng, LOWER_COLOURS), 10),
        "lower_type": str(lower_type),
        "shoes": _jitter(rng, _pick(rng, SHOE_COLOURS), 8),
        "hair": _jitter(rng, _pick(rng, HAIR_COLOURS), 8),
        "hair_style": str(hair_style),
        "cap": _jitter(rng, _pick(rng, SHIRT_COLOURS), 10),
        "skin": _jitter(rng, _pick(rng, SKIN_TONES), 8),
        "bag": str(bag),
        "bag_colour": _jitter(rng, _pick(rng, BAG_COLOURS), 10),
        "bag_side": int(rng.choice([-1, 1])),
        "height": float(rng.uniform(0.86, 1.0)),
        "width": float(rng.uniform(0.85, 1.2)),
    }


def _nearest(palette, colour):
    return min(range(len(palette)), key=lambda i: sum((a - b) ** 2 for a, b in zip(palette[i], colour)))


def _signature(person, group):
    """What a viewer can tell apart in one attribute group: palette entries rather
    than the per-identity colour jitter, and only attributes that are drawn."""
    p = person
    if group == "lower":
        return _nearest(LOWER_COLOURS, p["lower"]), p["lower_type"]
    if group == "shoes":
        return _nearest(SHOE_COLOURS, p["shoes"])
    if group == "hair":
        cap = _nearest(SHIRT_COLOURS, p["cap"]) if p["hair_style"] == "cap" else None
        return _nearest(HAIR_COLOURS, p["hair"]), p["hair_style"], cap
    if group == "bag":
        colour = _nearest(BAG_COLOURS, p["bag_colour"]) if p["bag"] != "none" else None
        return p["bag"], colour, p["bag_side"] if p["bag"] == "handbag" else None
    if group == "body":
        return _nearest(SKIN_TONES, p["skin"])
    second = _nearest(SHIRT_COLOURS, p["shirt2"]) if p["pattern"] != "solid" else None
    return p["long_sleeves"], second


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------

# Shirt phrase per pattern, from the sleeve length, main colour and second colour.
_SHIRT_PHRASES = {
    "solid": "{sleeves} {c1} shirt",
    "hstripes": "{sleeves} {c1} shirt with {c2} horizontal stripes",
    "vstripes": "{sleeves} {c1} shirt with {c2} vertical stripes",
    "checks": "{sleeves} {c1} and {c2} checked shirt",
    "twotone": "{sleeves} {c1} and {c2} two-tone shirt",
}


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_person(person):
    """An English caption of what identifies ``person`` (a :func:`_sample_person` dict), e.g.

        "a person with short black hair wearing a short-sleeved red shirt with white vertical
        stripes, blue trousers and white shoes, carrying a black backpack."

    Colours are named after their nearest palette entry (the per-identity jitter is not
    visible in words); skin tone and body build are left out.
    """
    p = person

    def colour(palette, names, key):
        return names[_nearest(palette, p[key])]

    if p["hair_style"] == "cap":
        head = "in " + _with_article(colour(SHIRT_COLOURS, SHIRT_COLOUR_NAMES, "cap") + " cap")
    else:
        head = f"with {p['hair_style']} {colour(HAIR_COLOURS, HAIR_COLOUR_NAMES, 'hair')} hair"
    shirt = _with_article(_SHIRT_PHRASES[p["pattern"]].format(
        sleeves="long-sleeved" if p["long_sleeves"] else "short-sleeved",
        c1=colour(SHIRT_COLOURS, SHIRT_COLOUR_NAMES, "shirt"),
        c2=colour(SHIRT_COLOURS, SHIRT_COLOUR_NAMES, "shirt2")))
    lower = f"{colour(LOWER_COLOURS, LOWER_COLOUR_NAMES, 'lower')} {p['lower_type']}"
    if p["lower_type"] == "skirt":
        lower = _with_article(lower)
    shoes = f"{colour(SHOE_COLOURS, SHOE_COLOUR_NAMES, 'shoes')} shoes"
    caption = f"a person {head} wearing {shirt}, {lower} and {shoes}"
    if p["bag"] != "none":
        caption += ", carrying " + _with_article(f"{colour(BAG_COLOURS, BAG_COLOUR_NAMES, 'bag_colour')} {p['bag']}")
    return caption + "."


def person_words(caption):
    """The words after "a person" in a :func:`describe_person` caption, without its full stop: a
    text query's words, e.g. "with short black hair wearing ..., carrying a black backpack"."""
    prefix = "a person "
    if not caption.startswith(prefix):
        raise ValueError(f"not a describe_person caption: {caption!r}")
    return caption[len(prefix):].rstrip(".")


def identity_captions(dataset_dir):
    """{pid: caption} for every identity (train and test) of a dataset written by
    :func:`generate_synthetic_market`: :func:`describe_person` of the person whose images carry
    that pid. Nothing is stored: the people are drawn again from the parameters in the manifest
    (deterministic, like the images)."""
    manifest = _read_manifest(dataset_dir)
    if manifest is None:
        raise ValueError(f"{dataset_dir}: no {MANIFEST_NAME} written by generate_synthetic_market")
    return {pid: describe_person(person) for pid, person in _sample_identities(manifest["params"]).items()}


def _sample_identities(params):
    """Appearance of every identity, keyed by pid.

    A fraction of identities are look-alikes of an earlier identity of the same
    split (train or test): same shirt, with two other attribute groups visibly
    re-drawn, so that telling them apart needs the finer details.
    """
    seed, n_train = params["seed"], params["num_train_ids"]
    identities = {}
    for pid in range(1, n_train + params["num_test_ids"] + 1):
        rng = _rng(seed, _TAG_IDENTITY, pid)
        first = 1 if pid <= n_train else n_train + 1
        person = _sample_person(rng)
        if pid > first and rng.random() < LOOKALIKE_PROB:
            base = identities[int(rng.integers(first, pid))]
            person = dict(base)
            for group in rng.choice(sorted(LOOKALIKE_GROUPS), 2, replace=False):
                while _signature(person, group) == _signature(base, group):
                    fresh = _sample_person(rng)
                    person.update({key: fresh[key] for key in LOOKALIKE_GROUPS[group]})
        identities[pid] = person
    return identities


def _sample_camera(seed, cam):
    """Camera ``cam`` (1-based).  Background type and preferred view cycle over a
    seeded permutation so that cameras are guaranteed to differ."""
    order = _rng(seed, _TAG_CAMERA, 0)
    bg_types = order.permutation(len(BACKGROUNDS))
    views = order.permutation(len(VIEWS))
    rng = _rng(seed, _TAG_CAMERA, cam)
    colours = rng.choice(len(BACKGROUND_COLOURS), 3, replace=False)
    return {
        "background": BACKGROUNDS[bg_types[(cam - 1) % len(BACKGROUNDS)]],
        "bg_colours": [BACKGROUND_COLOURS[i] for i in colours],
        "stripe_period": float(rng.uniform(0.15, 0.4)),       # in image widths
        "horizon": float(rng.uniform(0.45, 0.7)),             # wall/floor split, image heights
        "view": VIEWS[views[(cam - 1) % len(VIEWS)]],
        "gain": float(rng.uniform(*CAMERA_GAIN)),
        "tint": rng.uniform(1 - CAMERA_TINT, 1 + CAMERA_TINT, 3),
        "ramp": float(rng.uniform(-0.35, 0.35)),              # left-to-right illumination change
        "scale": float(rng.uniform(0.78, 0.95)),              # figure height / image height
        "occlusion": float(rng.uniform(0.15, 0.4)),
        "background_person": float(rng.uniform(0.1, 0.3)),
        "blur": float(rng.uniform(0.0, 0.9)),                 # Gaussian radius, output pixels
        "noise": float(rng.uniform(2.0, 7.0)),
    }


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------

class _Figure:
    """Maps figure coordinates to canvas pixels and draws body parts.

    Figure coordinates are in units of the figure height: x is centred on the
    body axis (positive = the person's facing direction in side view), y runs
    from 0 (top of the head) to 1 (soles).

    ``mask`` (an "L" image of the canvas size, or None) receives every shape drawn, in the
    value ``mask_value`` instead of its colour: the person's silhouette, drawn by the very
    calls that draw the person, so it matches the image pixel for pixel.
    """

    def __init__(self, image, draw, cx, top, size, mirror, mask=None, mask_value=255):
        self.image, self.draw = image, draw
        self.cx, self.top, self.size = cx, top, size
        self.sign = -1.0 if mirror else 1.0
        self.mask, self.mask_value = mask, mask_value
        self.mask_draw = ImageDraw.Draw(mask) if mask is not None else None

    def xy(self, x, y):
        return (self.cx + self.sign * x * self.size, self.top + y * self.size)

    def _shape(self, kind, coords, fill, **kwargs):
        """``ImageDraw.<kind>`` on the image, and on the mask in the mask value."""
        getattr(self.draw, kind)(coords, fill=fill, **kwargs)
        if self.mask_draw is not None:
            getattr(self.mask_draw, kind)(coords, fill=self.mask_value, **kwargs)

    def polygon(self, points, fill):
        self._shape("polygon", [self.xy(x, y) for x, y in points], fill)

    def ellipse(self, x, y, rx, ry, fill):
        x0, y0 = self.xy(x - rx, y - ry)
        x1, y1 = self.xy(x + rx, y + ry)
        self._shape("ellipse", [min(x0, x1), y0, max(x0, x1), y1], fill)

    def limb(self, x0, y0, x1, y1, width, fill):
        """A thick segment with round ends."""
        w = max(1, int(round(width * self.size)))
        self._shape("line", [self.xy(x0, y0), self.xy(x1, y1)], fill, width=w)
        for x, y in ((x0, y0), (x1, y1)):
            self.ellipse(x, y, width / 2, width / 2, fill)

    def patterned_polygon(self, points, person):
        """Fill a polygon (the torso) with the person's shirt pattern."""
        pixels = [self.xy(x, y) for x, y in points]
        xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
        x0, y0 = int(np.floor(min(xs))), int(np.floor(min(ys)))
        w, h = int(np.ceil(max(xs))) - x0 + 1, int(np.ceil(max(ys))) - y0 + 1
        tile = Image.new("RGB", (w, h), person["shirt"])
        tile_draw = ImageDraw.Draw(tile)
        period = max(2, int(round(person["stripe_period"] * self.size)))
        c2 = person["shirt2"]
        pattern = person["pattern"]
        if pattern in ("hstripes", "checks"):
            for y in range(0, h, period):
                tile_draw.rectangle([0, y, w, y + period // 2 - 1], fill=c2)
        if pattern in ("vstripes", "checks"):
            for x in range(0, w, period):
                tile_draw.rectangle([x, 0, x + period // 2 - 1, h], fill=c2)
        if pattern == "twotone":   # lower part of the shirt in the second colour
            tile_draw.rectangle([0, int(h * 0.55), w, h], fill=c2)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in pixels], fill=255)
        self.image.paste(tile, (x0, y0), mask)
        if self.mask is not None:
            self.mask.paste(self.mask_value, (x0, y0, x0 + w, y0 + h), mask)


def _draw_person(image, person, view, mirror, pose, cx, top, size, mask=None, mask_value=255):
    """Draw ``person`` seen from ``view``; ``pose`` = (arm swing, leg stride) in [-1, 1].
    With ``mask``, also paint the person's silhouette into it in ``mask_value`` (``_Figure``)."""
    draw = ImageDraw.Draw(image)
    f = _Figure(image, draw, cx, top, size * person["height"], mirror, mask, mask_value)
    w = person["width"]
    side = view == "side"
    sh = (0.075 if side else 0.125) * w      # half shoulder width
    hip = (0.07 if side else 0.1) * w        # half hip width
    arm_swing, stride = pose
    skin, lower, shirt = person["skin"], person["lower"], person["shirt"]
    # The person's own left/right as seen by the camera: swapped when seen from behind.
    bag_x = person["bag_side"] * (-1 if view == "back" else 1)

    # Backpack seen from the side sticks out behind the back, under everything else.
    if person["bag"] == "backpack" and side:
        f.polygon([(-sh - 0.07, 0.18), (-sh + 0.03, 0.17), (-sh + 0.03, 0.43), (-sh - 0.07, 0.42)],
                  person["bag_colour"])

    # Legs: hip joints to ankles, stride moves the feet apart (side view: fore/aft).
    leg_w = 0.075 * w
    if side:
        feet = [(0.09 * stride, 0.95), (-0.09 * stride, 0.95)]
        hips = [(0.0, 0.53), (0.0, 0.53)]
    else:
        feet = [(-hip * 0.55 - 0.03 * stride, 0.95), (hip * 0.55 + 0.03 * stride, 0.95)]
        hips = [(-hip * 0.5, 0.53), (hip * 0.5, 0.53)]
    knee_y = {"trousers": 0.95, "shorts": 0.68, "skirt": 0.5}[person["lower_type"]]
    for (hx, hy), (fx, fy) in zip(hips, feet):
        f.limb(hx, hy, fx, fy, leg_w, skin)
        if knee_y > hy:    # cloth from the hip down to knee_y
            t = (knee_y - hy) / (fy - hy)
            f.limb(hx, hy, hx + t * (fx - hx), knee_y, leg_w * 1.08, lower)
    for fx, fy in feet:
        f.ellipse(fx + (0.025 if side else 0.0), fy + 0.02, 0.045, 0.025, person["shoes"])
    f.polygon([(-hip, 0.47), (hip, 0.47), (hip, 0.57), (-hip, 0.57)], lower)
    if person["lower_type"] == "skirt":
        f.polygon([(-hip, 0.47), (hip, 0.47), (hip * 1.45, 0.72), (-hip * 1.45, 0.72)], lower)

    # Long hair falls behind the shoulders.
    if person["hair_style"] == "long":
        f.polygon([(-0.06, 0.06), (0.06, 0.06), (0.07, 0.24), (-0.07, 0.24)], person["hair"])

    # Torso and neck.
    f.limb(0.0, 0.11, 0.0, 0.16, 0.035, skin)
    f.patterned_polygon([(-sh, 0.15), (sh, 0.15), (hip * 1.02, 0.52), (-hip * 1.02, 0.52)], person)

    # Arms: shoulder to hand; a sleeve covers the upper arm or the whole arm.
    arm_w = 0.055 * w
    if side:
        arms = [(0.0, 0.17, 0.1 * arm_swing, 0.49)]
    else:
        arms = [(s * (sh - 0.02), 0.17, s * (sh + 0.015) + 0.03 * s * arm_swing, 0.49) for s in (-1, 1)]
    sleeve_end = 1.0 if person["long_sleeves"] else 0.45
    for x0, y0, x1, y1 in arms:
        f.limb(x0, y0, x1, y1, arm_w, skin)
        f.limb(x0, y0, x0 + sleeve_end * (x1 - x0), y0 + sleeve_end * (y1 - y0), arm_w * 1.1, shirt)
        f.ellipse(x1, y1 + 0.01, 0.022, 0.025, skin)

    # Carried objects.
    if person["bag"] == "backpack":
        if view == "back":
            f.polygon([(-sh * 0.8, 0.18), (sh * 0.8, 0.18), (sh * 0.75, 0.43), (-sh * 0.75, 0.43)],
                      person["bag_colour"])
        elif view == "front":    # only the straps
            for s in (-1, 1):
                f.limb(s * sh * 0.55, 0.16, s * sh * 0.6, 0.34, 0.025, person["bag_colour"])
    elif person["bag"] == "handbag":
        hx = 0.02 if side else bag_x * (sh + 0.04)
        f.limb(hx * 0.6, 0.17, hx, 0.42, 0.012, person["bag_colour"])
        f.polygon([(hx - 0.045, 0.42), (hx + 0.045, 0.42), (hx + 0.05, 0.53), (hx - 0.05, 0.53)],
                  person["bag_colour"])

    # Head: hair on top, face visible unless seen from behind.
    hx = 0.012 if side else 0.0
    f.ellipse(hx, 0.065, 0.056, 0.066, person["hair"])
    if view != "back":
        face_x = hx + (0.015 if side else 0.0)
        f.ellipse(face_x, 0.078, 0.046 if not side else 0.04, 0.052, skin)
    if person["hair_style"] == "cap":
        f.ellipse(hx, 0.045, 0.058, 0.042, person["cap"])
        brim = 0.05 if side else 0.0
        f.polygon([(hx - 0.06 + brim, 0.045), (hx + 0.06 + brim, 0.045),
                   (hx + 0.06 + brim, 0.06), (hx - 0.06 + brim, 0.06)], person["cap"])


def _draw_background(camera, rng, size):
    """Camera background with a per-image offset (the crop moves with the person)."""
    W, H = size
    c0, c1, c2 = camera["bg_colours"]
    kind = camera["background"]
    image = Image.new("RGB", size, c0)
    draw = ImageDraw.Draw(image)
    if kind == "wall_floor":
        horizon = int(H * (camera["horizon"] + rng.uniform(-0.05, 0.05)))
        draw.rectangle([0, horizon, W, H], fill=c1)
        draw.rectangle([0, horizon - max(1, H // 64), W, horizon], fill=c2)   # skirting board
    elif kind == "stripes":
        period = max(4, int(W * camera["stripe_period"]))
        for x in range(-int(rng.integers(period)), W, period):
            draw.rectangle([x, 0, x + period // 3, H], fill=c1)
    elif kind == "gradient":
        t = np.linspace(0.0, 1.0, H)[:, None, None]
        arr = (1 - t) * np.asarray(c0, float) + t * np.asarray(c1, float)
        image = Image.fromarray(np.broadcast_to(arr, (H, W, 3)).astype(np.uint8))
    elif kind == "tiles":
        horizon = int(H * camera["horizon"])
        tile = max(4, W // 5)
        offset = int(rng.integers(tile))
        for ty, y in enumerate(range(horizon, H, tile)):
            for tx, x in enumerate(range(-offset, W, tile)):
                if (tx + ty) % 2:
                    draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=c1)
        draw.rectangle([0, 0, W, horizon], fill=c2)
    return image


def _apply_camera(image, camera, rng):
    """Lighting, white balance, illumination ramp, blur and sensor noise (output resolution)."""
    if camera["blur"] > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera["blur"] * rng.uniform(0.7, 1.3)))
    arr = np.asarray(image, dtype=np.float32)
    H, W = arr.shape[:2]
    gain = camera["gain"] * rng.uniform(0.9, 1.1)
    ramp = 1.0 + camera["ramp"] * np.linspace(-0.5, 0.5, W, dtype=np.float32)[None, :, None]
    arr = arr * (gain * camera["tint"].astype(np.float32))[None, None, :] * ramp
    arr += rng.normal(0.0, camera["noise"], arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _random_pose(rng):
    return (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))


def _render(camera, rng, height, width, person=None, junk=False, with_mask=False):
    """One bounding box: ``person`` seen by ``camera`` (None: a background crop).

    ``with_mask``: returns (image, mask) with the target person's visible silhouette, a
    (height, width) bool array: drawn at the supersampled size by the calls that draw the
    person, less what the occluder drawn over it covers, and downsampled as the image is
    (a pixel is in the mask when the person covers at least half of it). The person walking
    behind is not part of it. The random stream is read exactly as without the mask, so
    the image is the same.
    """
    W, H = width * SUPERSAMPLE, height * SUPERSAMPLE
    image = _draw_background(camera, rng, (W, H))
    mask = Image.new("L", (W, H), 0) if with_mask else None

    def view():
        others = [v for v in VIEWS if v != camera["view"]]
        return camera["view"] if rng.random() < 0.6 else others[rng.integers(len(others))]

    # Somebody walking further away, behind the target.
    if person is None or rng.random() < camera["background_person"]:
        s = H * rng.uniform(0.45, 0.7)
        _draw_person(image, _sample_person(rng), view(), rng.random() < 0.5, _random_pose(rng),
                     W * rng.uniform(-0.1, 1.1), H * rng.uniform(0.0, 0.3), s)

    if person is not None:
        size = H * camera["scale"] * rng.uniform(0.92, 1.08)
        if junk:   # a bad detection: far too large or cut off
            size *= rng.uniform(1.6, 2.5)
        cx = W * (0.5 + rng.uniform(-0.08, 0.08))
        top = (H - size * person["height"]) * rng.uniform(0.2, 0.8)
        _draw_person(image, person, view(), rng.random() < 0.5, _random_pose(rng), cx, top, size, mask, 255)

    # Somebody closer to the camera, partly covering the target from one side.
    if person is not None and rng.random() < camera["occlusion"]:
        s = H * camera["scale"] * rng.uniform(1.0, 1.2)
        cx = W * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.45, 0.7))
        _draw_person(image, _sample_person(rng), view(), rng.random() < 0.5, _random_pose(rng),
                     cx, H * rng.uniform(0.0, 0.15), s, mask, 0)

    image = image.resize((width, height), Image.BILINEAR)
    image = _apply_camera(image, camera, rng)
    if not with_mask:
        return image
    return image, np.asarray(mask.resize((width, height), Image.BILINEAR)) >= 128


def _save_jpeg(image, path):
    # Fixed encoder settings: same pixels -> same bytes.
    image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)


# ----------------------------------------------------------------------------
# Dataset layout
# ----------------------------------------------------------------------------

def _plan(params):
    """Every image to draw as (split, pid, cam, index, kind); depends only on params."""
    seed, n_cams = params["seed"], params["num_cameras"]
    n_train, n_test = params["num_train_ids"], params["num_test_ids"]
    plan = []
    for pid in range(1, n_train + n_test + 1):
        rng = _rng(seed, _TAG_PLAN, pid)
        if pid <= n_train:
            cams = rng.permutation(n_cams)[:rng.integers(min(TRAIN_CAMERAS_PER_ID[0], n_cams),
                                                         min(TRAIN_CAMERAS_PER_ID[1], n_cams) + 1)] + 1
            n = int(rng.integers(TRAIN_IMAGES_PER_ID[0], TRAIN_IMAGES_PER_ID[1] + 1))
            # Each camera once, the rest at random.
            image_cams = list(cams) + list(rng.choice(cams, n - len(cams)))
            plan += [("train", pid, int(c), k, "person") for k, c in enumerate(image_cams)]
        else:
            cams = rng.permutation(n_cams)[:rng.integers(min(TEST_CAMERAS_PER_ID[0], n_cams),
                                                         min(TEST_CAMERAS_PER_ID[1], n_cams) + 1)] + 1
            nq = min(int(rng.integers(QUERIES_PER_ID[0], QUERIES_PER_ID[1] + 1)), len(cams))
            ng = int(rng.integers(GALLERY_IMAGES_PER_ID[0], GALLERY_IMAGES_PER_ID[1] + 1))
            # Gallery cycles over all the identity's cameras (>= 2), so each query
            # has a match from another camera.
            gallery_cams = [cams[i % len(cams)] for i in range(max(ng, len(cams)))]
            image_cams = [("query", c) for c in cams[:nq]] + [("gallery", c) for c in gallery_cams]
            plan += [(split, pid, int(c), k, "person") for k, (split, c) in enumerate(image_cams)]
    rng = _rng(seed, _TAG_PLAN, 0)
    plan += [("gallery", 0, int(c), k, "distractor")
             for k, c in enumerate(rng.integers(1, n_cams + 1, params["num_distractors"]))]
    plan += [("gallery", -1, int(c), k, "junk")
             for k, c in enumerate(rng.integers(1, n_cams + 1, params["num_junk"]))]
    return plan


def _file_name(pid, cam, index):
    return f"{pid:04d}_c{cam}s1_{index:06d}_01.jpg"


class _Layout(NamedTuple):
    """What one generator writes, as far as reusing a finished directory is concerned."""
    generator: str     # the manifest's "generator" entry
    function: str      # the public function that writes it (error messages)
    stamps: dict       # manifest entries that must match for reuse: the generator's versions
    image_dirs: dict   # sub-directory -> manifest count giving its number of .jpg files
    files: tuple = ()  # further files a complete directory holds


_MARKET = _Layout(
    "promptsg.synthetic_market", "generate_synthetic_market", {"version": GENERATOR_VERSION},
    {SPLIT_DIRS["train"]: "train_images", SPLIT_DIRS["query"]: "query_images",
     SPLIT_DIRS["gallery"]: "gallery_images"})
_POOL = _Layout(
    "promptsg.synthetic_caption_pool", "generate_caption_pool",
    {"version": GENERATOR_VERSION, "caption_version": CAPTION_VERSION}, {POOL_IMAGE_DIR: "images"},
    (CAPTIONS_NAME,))


def _write_json(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _generate_into(out_dir, params):
    """Write every image of the re-ID dataset into ``out_dir``; returns the manifest counts."""
    cameras = {c: _sample_camera(params["seed"], c) for c in range(1, params["num_cameras"] + 1)}
    identities = _sample_identities(params)
    for d in SPLIT_DIRS.values():
        os.makedirs(osp.join(out_dir, d))
    counts = {split: 0 for split in SPLIT_DIRS}
    for split, pid, cam, k, kind in _plan(params):
        image = _render_planned(params, cameras[cam], identities, pid, k, kind)
        _save_jpeg(image, osp.join(out_dir, SPLIT_DIRS[split], _file_name(pid, cam, k)))
        counts[split] += 1

    return {
        "train_ids": params["num_train_ids"],
        "test_ids": params["num_test_ids"],
        "train_images": counts["train"],
        "query_images": counts["query"],
        "gallery_images": counts["gallery"],     # includes distractors and junk
        "distractor_images": params["num_distractors"],
        "junk_images": params["num_junk"],
    }


def _render_planned(params, camera, identities, pid, k, kind, with_mask=False):
    """Image ``k`` of a ``_plan`` entry (identity ``pid``, seen by ``camera``), from its own
    random stream; with ``with_mask``, (image, mask) as ``_render`` gives them."""
    seed, H, W = params["seed"], params["height"], params["width"]
    if kind == "person":
        return _render(camera, _rng(seed, _TAG_IMAGE, pid, k), H, W, identities[pid], with_mask=with_mask)
    if kind == "distractor":
        rng = _rng(seed, _TAG_DISTRACTOR, k)
        # Three in four are people not in the test set, the rest empty background.
        stranger = _sample_person(rng) if rng.random() < 0.75 else None
        return _render(camera, rng, H, W, stranger, with_mask=with_mask)
    rng = _rng(seed, _TAG_JUNK, k)
    return _render(camera, rng, H, W, _sample_person(rng), junk=True, with_mask=with_mask)


def _generate_pool_into(out_dir, params):
    """Write the caption pool into ``out_dir``; returns the manifest counts.

    Pool identities come from their own random streams (``_TAG_POOL_*``), so none of them is a
    re-ID identity; each image is seen by a random one of ``POOL_NUM_CAMERAS`` cameras.
    """
    seed, H, W = params["seed"], params["height"], params["width"]
    cameras = {c: _sample_camera(seed, c) for c in range(1, POOL_NUM_CAMERAS + 1)}
    os.makedirs(osp.join(out_dir, POOL_IMAGE_DIR))
    captions = {}
    for pid in range(1, params["num_ids"] + 1):
        person = _sample_person(_rng(seed, _TAG_POOL_IDENTITY, pid))
        caption = describe_person(person)
        for k in range(params["images_per_id"]):
            rng = _rng(seed, _TAG_POOL_IMAGE, pid, k)
            camera = cameras[int(rng.integers(1, POOL_NUM_CAMERAS + 1))]
            name = f"{pid:05d}_{k:03d}.jpg"
            _save_jpeg(_render(camera, rng, H, W, person), osp.join(out_dir, POOL_IMAGE_DIR, name))
            captions[name] = caption
    _write_json(osp.join(out_dir, CAPTIONS_NAME), captions)
    return {"identities": params["num_ids"], "images": len(captions)}


def _read_manifest(dataset_dir, layout=_MARKET):
    try:
        with open(osp.join(dataset_dir, MANIFEST_NAME)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == layout.generator else None


def _differences(manifest, dataset_dir, layout):
    """How ``dataset_dir`` differs from what the generator wrote into it (its manifest's counts and
    files): a list of short phrases, empty when nothing was added or removed."""
    found = []
    for f in layout.files:
        if not osp.isfile(osp.join(dataset_dir, f)):
            found.append(f"{f} missing")
    for d, count_key in layout.image_dirs.items():
        try:
            count = sum(name.endswith(".jpg") for name in os.listdir(osp.join(dataset_dir, d)))
        except OSError:
            count = 0
        if count != manifest["counts"][count_key]:
            found.append(f"{count} images in {d}/ where the generator wrote {manifest['counts'][count_key]}")
    return found


REGENERATE = "python -m promptsg.data --regenerate"
_warned = set()   # folders whose difference this process has already reported


def _generate_or_reuse(dataset_dir, layout, params, generate_into, regenerate=False):
    """Generate ``dataset_dir`` only when it is missing (or when ``regenerate`` asks); otherwise
    use it as it is. Nothing the generator did not just write is ever deleted.

    * Missing: ``generate_into(tmp_dir, params)`` writes the files into a hidden sibling directory
      and returns the manifest counts; the manifest is written last and the directory renamed
      into place, so an interrupted run leaves nothing half-written under ``dataset_dir``.
    * Our manifest, same parameters and generator version: used as it is. If images were added
      or removed since (a user trying a case), one warning line says how it differs; the files
      stay as they are.
    * Our manifest with other parameters: ``RuntimeError`` naming them (remove the folder or use
      another root). Another generator version: ``RuntimeError`` with the explicit command that
      regenerates it (``regenerate=True``).
    * No manifest of ours: ``RuntimeError``; the folder is never touched.
    """
    dataset_dir = osp.abspath(os.fspath(dataset_dir))
    existing = _read_manifest(dataset_dir, layout)
    if osp.lexists(dataset_dir) and existing is None:
        raise RuntimeError(f"{dataset_dir} exists but was not created by {layout.function} "
                           f"(no {MANIFEST_NAME}); remove it or choose another directory")
    if existing is not None and not regenerate:
        stale = {k: existing.get(k) for k, v in layout.stamps.items() if existing.get(k) != v}
        if stale or existing.get("params") != params:
            if stale:
                what = ", ".join(f"{k} {v} (this code writes {layout.stamps[k]})" for k, v in stale.items())
                how = f"regenerate it with `{REGENERATE} {dataset_dir}` (its files are replaced)"
            else:
                what = f"other parameters ({_param_changes(existing.get('params') or {}, params)})"
                how = "remove it to generate it with these parameters"
            raise RuntimeError(f"{dataset_dir} was generated with {what}; {how}, or use another root")
        changes = _differences(existing, dataset_dir, layout)
        if changes and dataset_dir not in _warned:
            _warned.add(dataset_dir)
            logger.warning("%s differs from what the generator wrote (%s): used as it is; `%s %s` restores it",
                           dataset_dir, "; ".join(changes), REGENERATE, dataset_dir)
        return existing

    parent, name = osp.split(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        counts = generate_into(tmp_dir, params)
        manifest = {"generator": layout.generator, **layout.stamps, "params": params, "counts": counts}
        _write_json(osp.join(tmp_dir, MANIFEST_NAME), manifest)
        if osp.lexists(dataset_dir):   # regenerate=True on our own folder: move it aside first
            old_dir = osp.join(parent, f".{name}.old-{uuid.uuid4().hex}")
            os.rename(dataset_dir, old_dir)
            shutil.rmtree(old_dir)
        try:
            os.rename(tmp_dir, dataset_dir)
        except OSError:
            # Another process installed a dataset meanwhile: accept it if it is what we want.
            current = _read_manifest(dataset_dir, layout)
            if current is None or current.get("params") != params or _differences(current, dataset_dir, layout):
                raise
            manifest = current
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)   # no-op once renamed into place
    return manifest


def _param_changes(old, new):
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k))


def regenerate_dataset(dataset_dir):
    """Write ``dataset_dir`` afresh with the parameters of its manifest and this generator
    version (its files are replaced, added files included); returns the new manifest."""
    manifest = _read_manifest(dataset_dir, _MARKET) or _read_manifest(dataset_dir, _POOL)
    if manifest is None:
        raise ValueError(f"no {MANIFEST_NAME} of generate_synthetic_market or generate_caption_pool: "
                         f"not a generated dataset, left as it is")
    layouts = {_MARKET.generator: (_MARKET, _generate_into), _POOL.generator: (_POOL, _generate_pool_into)}
    layout, generate_into = layouts[manifest["generator"]]
    return _generate_or_reuse(dataset_dir, layout, manifest["params"], generate_into, regenerate=True)


def generate_synthetic_market(
    dataset_dir,
    *,
    seed=DEFAULT_SEED,
    num_train_ids=DEFAULT_NUM_TRAIN_IDS,
    num_test_ids=DEFAULT_NUM_TEST_IDS,
    num_cameras=DEFAULT_NUM_CAMERAS,
    num_distractors=DEFAULT_NUM_DISTRACTORS,
    num_junk=DEFAULT_NUM_JUNK,
    height=DEFAULT_HEIGHT,
    width=DEFAULT_WIDTH,
):
    """Generate a SyntheticMarket dataset in ``dataset_dir`` if it is missing; returns its manifest.

    * ``dataset_dir`` missing: generated. It is built in a hidden sibling directory and renamed
      into place when complete, so an interrupted run never leaves a partial dataset; concurrent
      callers (one per training process) are safe: whoever finishes second uses the first one's.
    * Generated before with the same parameters and generator version: used as it is, with one
      warning if images were added or removed since (they stay as they are).
    * Generated with other parameters or another generator version, or not generated here at
      all: ``RuntimeError``. Nothing is deleted; ``regenerate_dataset(dataset_dir)`` (``python -m
      promptsg.data --regenerate DIR``) rewrites a folder of ours explicitly.
    """
    if not 2 <= num_cameras <= 9:
        raise ValueError(f"num_cameras must be in [2, 9] (single-digit Market camera ids), got {num_cameras}")
    if num_train_ids < 1 or num_test_ids < 1 or num_train_ids + num_test_ids > 9999:
        raise ValueError("need >= 1 train and test identity and at most 9999 in total (4-digit pids)")
    if num_distractors < 0 or num_junk < 0 or height < 16 or width < 8:
        raise ValueError("num_distractors/num_junk must be >= 0 and images at least 16x8")
    params = {
        "seed": int(seed), "num_train_ids": int(num_train_ids), "num_test_ids": int(num_test_ids),
        "num_cameras": int(num_cameras), "num_distractors": int(num_distractors),
        "num_junk": int(num_junk), "height": int(height), "width": int(width),
    }
    return _generate_or_reuse(dataset_dir, _MARKET, params, _generate_into)


def generate_caption_pool(dataset_dir, *, seed=DEFAULT_SEED, num_ids, images_per_id,
                          height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH):
    """Generate (or reuse) a pool of captioned people in ``dataset_dir``; returns its manifest.

    ``num_ids`` identities, none of them an identity of the re-ID dataset of any seed (they come
    from other random streams), with ``images_per_id`` images each and the caption
    :func:`describe_person` gives them, in ``captions.json`` (file name -> caption).  Reuse,
    refusal and atomicity are those of :func:`generate_synthetic_market`.
    """
    if not 1 <= num_ids <= 99999 or not 1 <= images_per_id <= 999:
        raise ValueError("need 1 to 99999 identities with 1 to 999 images each")
    if height < 16 or width < 8:
        raise ValueError("images must be at least 16x8")
    params = {"seed": int(seed), "num_ids": int(num_ids), "images_per_id": int(images_per_id),
              "height": int(height), "width": int(width)}
    return _generate_or_reuse(dataset_dir, _POOL, params, _generate_pool_into)


def read_caption_pool(dataset_dir):
    """[(image path, caption)] of a pool written by :func:`generate_caption_pool`, sorted by path."""
    with open(osp.join(dataset_dir, CAPTIONS_NAME)) as fh:
        captions = json.load(fh)
    return [(osp.join(dataset_dir, POOL_IMAGE_DIR, name), captions[name]) for name in sorted(captions)]


class PersonMasks:
    """The silhouette of the person in each image of a generated SyntheticMarket dataset.

    ``masks = PersonMasks(dataset_dir); masks("0151_c1s1_000000_01.jpg")`` is a (height, width)
    bool array: the pixels the image's person covers (at least half of each), less what an
    occluder in front of it covers, at the image's size. It is re-rendered from the image's
    own random stream (the manifest's parameters and the file name's pid, camera and index),
    by the same drawing calls as the image: ``render`` also returns the image, equal to the
    file's pixels before JPEG encoding. A background crop (a distractor without a person) has
    an empty mask; a junk image's mask is its badly cropped person.
    """

    def __init__(self, dataset_dir):
        manifest = _read_manifest(dataset_dir)
        if manifest is None:
            raise ValueError(f"{dataset_dir}: no {MANIFEST_NAME} of generate_synthetic_market")
        if manifest.get("version") != GENERATOR_VERSION:
            raise ValueError(f"{dataset_dir}: generated by generator version {manifest.get('version')}, "
                             f"this one is version {GENERATOR_VERSION}: regenerate it")
        self.params = manifest["params"]
        self.size = (self.params["height"], self.params["width"])
        self._cameras = {c: _sample_camera(self.params["seed"], c)
                         for c in range(1, self.params["num_cameras"] + 1)}
        self._identities = _sample_identities(self.params)
        self._entries = {_file_name(pid, cam, k): (pid, cam, k, kind)
                         for _, pid, cam, k, kind in _plan(self.params)}

    def __contains__(self, file_name):
        return osp.basename(file_name) in self._entries

    def render(self, file_name):
        """(image, mask) of the dataset image ``file_name`` (a path or a base name)."""
        name = osp.basename(file_name)
        if name not in self._entries:
            raise KeyError(f"{name} is not an image of this dataset (seed {self.params['seed']})")
        pid, cam, k, kind = self._entries[name]
        return _render_planned(self.params, self._cameras[cam], self._identities, pid, k, kind, with_mask=True)

    def __call__(self, file_name):
        return self.render(file_name)[1]


# ----------------------------------------------------------------------------
# FastReID dataset
# ----------------------------------------------------------------------------

@DATASET_REGISTRY.register()
class SyntheticMarket(ImageDataset):
    """FastReID view of the synthetic dataset, generated into ``root/SyntheticMarket`` on first use.

    Parsing follows ``Market1501.process_dir``: pid 0 (distractors) stays in the
    gallery, pid -1 (junk) is skipped, camera ids become 0-based, and training
    pids/camids are prefixed with ``dataset_name``.  The size keywords are passed
    to :func:`generate_synthetic_market`; FastReID's loaders pass none, so train
    and test loaders agree on the default dataset.
    """
    _junk_pids = [0, -1]
    dataset_dir = "SyntheticMarket"
    dataset_name = "synthetic"

    def __init__(
        self,
        root="datasets",
        seed=DEFAULT_SEED,
        num_train_ids=DEFAULT_NUM_TRAIN_IDS,
        num_test_ids=DEFAULT_NUM_TEST_IDS,
        num_cameras=DEFAULT_NUM_CAMERAS,
        num_distractors=DEFAULT_NUM_DISTRACTORS,
        num_junk=DEFAULT_NUM_JUNK,
        height=DEFAULT_HEIGHT,
        width=DEFAULT_WIDTH,
        **kwargs,
    ):
        self.root = root
        self.dataset_dir = osp.join(self.root, self.dataset_dir)
        self.manifest = generate_synthetic_market(
            self.dataset_dir, seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
            num_cameras=num_cameras, num_distractors=num_distractors, num_junk=num_junk,
            height=height, width=width,
        )
        self.train_dir = osp.join(self.dataset_dir, SPLIT_DIRS["train"])
        self.query_dir = osp.join(self.dataset_dir, SPLIT_DIRS["query"])
        self.gallery_dir = osp.join(self.dataset_dir, SPLIT_DIRS["gallery"])
        self.check_before_run([self.dataset_dir, self.train_dir, self.query_dir, self.gallery_dir])

        train = lambda: self.process_dir(self.train_dir)
        query = lambda: self.process_dir(self.query_dir, is_train=False)
        gallery = lambda: self.process_dir(self.gallery_dir, is_train=False)
        super().__init__(train, query, gallery, **kwargs)

    @property
    def num_train_pids(self):
        return self.get_num_pids(self.train)

    @property
    def num_train_cams(self):
        return self.get_num_cams(self.train)

    def process_dir(self, dir_path, is_train=True):
        data = []
        # Sorted, and parsed from the file name only (not the whole path), unlike Market1501.
        for name in sorted(os.listdir(dir_path)):
            match = _NAME_RE.match(name)
            if match is None:
                continue
            pid, camid = map(int, match.groups())
            if pid == -1:
                continue  # junk images are ignored, as in Market-1501
            camid -= 1  # index starts from 0
            if is_train:
                pid = self.dataset_name + "_" + str(pid)
                camid = self.dataset_name + "_" + str(camid)
            data.append((osp.join(dir_path, name), pid, camid))
        return data


@DATASET_REGISTRY.register()
class SyntheticMarketTiny(SyntheticMarket):
    """A tiny split of the same generator (8 train / 8 test identities, about 80 + 70 images) for
    smoke tests and CI: a run trains and evaluates in seconds. Keywords override the sizes."""
    dataset_dir = "SyntheticMarketTiny"
    dataset_name = "synthetic_tiny"

    def __init__(self, root="datasets", **kwargs):
        sizes = {"num_train_ids": 8, "num_test_ids": 8, "num_distractors": 20, "num_junk": 2}
        super().__init__(root, **{**sizes, **kwargs})
