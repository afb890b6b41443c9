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

The package, one file per part:

    people.py        who is drawn: palettes, random attributes, look-alikes, drawing a person
    cameras.py       what each camera changes, and one bounding box: a person seen by a camera
    market.py        the Market-1501 split: its images, their file names, ``generate_synthetic_market``
    captions.py      ``describe_person`` and the caption pool (``generate_caption_pool``)
    folders.py       the generated folders: layouts, manifests, versions, generate-or-reuse
    masks.py         ``PersonMasks``, each image's person drawn again as a silhouette
    registration.py  ``SyntheticMarket`` and ``SyntheticMarketTiny`` in FastReID's
                     ``DATASET_REGISTRY``, and ``regenerate_dataset``
"""
# Each part's public names, and the helpers the tests redraw images with, as promptsg.data.synthetic.NAME.
from .cameras import (BACKGROUND_COLOURS, BACKGROUNDS, CAMERA_GAIN, CAMERA_TINT, JPEG_QUALITY, SUPERSAMPLE, VIEWS,
                      _render, _sample_camera, _save_jpeg)
from .captions import (BAG_COLOUR_NAMES, HAIR_COLOUR_NAMES, LOWER_COLOUR_NAMES, POOL_NUM_CAMERAS, SHIRT_COLOUR_NAMES,
                       SHOE_COLOUR_NAMES, describe_person, generate_caption_pool, identity_captions, person_words,
                       read_caption_pool)
from .folders import (CAPTION_VERSION, CAPTIONS_NAME, GENERATOR_VERSION, MANIFEST_NAME, POOL_IMAGE_DIR, REGENERATE,
                      SPLIT_DIRS, _MARKET, _read_manifest)
from .market import (DEFAULT_HEIGHT, DEFAULT_NUM_CAMERAS, DEFAULT_NUM_DISTRACTORS, DEFAULT_NUM_JUNK,
                     DEFAULT_NUM_TEST_IDS, DEFAULT_NUM_TRAIN_IDS, DEFAULT_SEED, DEFAULT_WIDTH, GALLERY_IMAGES_PER_ID,
                     QUERIES_PER_ID, TEST_CAMERAS_PER_ID, TRAIN_CAMERAS_PER_ID, TRAIN_IMAGES_PER_ID,
                     generate_synthetic_market)
from .masks import PersonMasks
from .people import (BAG_COLOURS, HAIR_COLOURS, LOOKALIKE_GROUPS, LOOKALIKE_PROB, LOWER_COLOURS, PATTERNS,
                     SHIRT_COLOURS, SHOE_COLOURS, SKIN_TONES, _TAG_IMAGE, _draw_person, _rng, _sample_identities)
from .registration import SyntheticMarket, SyntheticMarketTiny, regenerate_dataset

__all__ = ["PersonMasks", "SyntheticMarket", "describe_person", "generate_caption_pool", "regenerate_dataset",
           "generate_synthetic_market", "identity_captions", "person_words"]
