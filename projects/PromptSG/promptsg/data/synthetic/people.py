"""The synthetic people: palettes, random attributes (look-alikes included) and the drawing of a person."""
import numpy as np
from PIL import Image, ImageDraw

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
