"""Captions of the synthetic people (describe_person), and the caption pool of other people."""
import json
import os
import os.path as osp

from .cameras import _render, _sample_camera, _save_jpeg
from .folders import (CAPTIONS_NAME, MANIFEST_NAME, POOL_IMAGE_DIR, _POOL, _generate_or_reuse, _read_manifest,
                      _write_json)
from .market import DEFAULT_HEIGHT, DEFAULT_SEED, DEFAULT_WIDTH
from .people import (BAG_COLOURS, HAIR_COLOURS, LOWER_COLOURS, SHIRT_COLOURS, SHOE_COLOURS, _TAG_POOL_IDENTITY,
                     _TAG_POOL_IMAGE, _nearest, _rng, _sample_identities, _sample_person)

# Caption words of the palette entries, in palette order: common colour names.
SHIRT_COLOUR_NAMES = ("red", "dark red", "blue", "navy", "light blue", "green", "dark green", "yellow",
                      "white", "black", "grey", "pink", "orange", "purple", "brown", "beige")
LOWER_COLOUR_NAMES = ("black", "dark blue", "blue", "grey", "beige", "brown", "white", "dark green", "red")
SHOE_COLOUR_NAMES = ("black", "white", "brown", "grey", "red", "blue")
HAIR_COLOUR_NAMES = ("black", "dark brown", "brown", "blond", "grey")
BAG_COLOUR_NAMES = ("black", "dark grey", "red", "blue", "brown", "white", "green")

# The caption pool is seen by the re-ID dataset's cameras (same seed) and as many more, so the
# pretrained image tower does not learn six backgrounds only.
POOL_NUM_CAMERAS = 12

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
