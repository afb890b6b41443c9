"""The SyntheticMarket split: the images of each identity, their file names, and generate_synthetic_market."""
import os
import os.path as osp

from .cameras import _render, _sample_camera, _save_jpeg
from .folders import SPLIT_DIRS, _MARKET, _generate_or_reuse
from .people import _TAG_DISTRACTOR, _TAG_IMAGE, _TAG_JUNK, _TAG_PLAN, _rng, _sample_identities, _sample_person

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
