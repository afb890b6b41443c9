"""The synthetic cameras, and one bounding box drawn and saved: a person seen by a camera."""
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .people import _TAG_CAMERA, _draw_person, _rng, _sample_person

VIEWS = ("front", "back", "side")
BACKGROUNDS = ("solid", "wall_floor", "stripes", "gradient", "tiles")
BACKGROUND_COLOURS = [
    (150, 150, 150), (185, 175, 160), (110, 115, 125), (90, 100, 80), (200, 195, 185),
    (160, 130, 100), (70, 75, 85), (130, 150, 165), (175, 160, 140), (100, 90, 80),
]

# Camera-to-camera photometric change: gain range and white-balance spread (per channel +-).
CAMERA_GAIN = (0.8, 1.2)
CAMERA_TINT = 0.1

SUPERSAMPLE = 2                    # draw at 2x and downsample: antialiased edges
JPEG_QUALITY = 90


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
