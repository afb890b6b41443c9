"""The generated folders: their layouts and manifests, the generator versions, and generate-or-reuse."""
import json
import logging
import os
import os.path as osp
import shutil
import tempfile
import uuid
from typing import NamedTuple

logger = logging.getLogger(__name__)

# Bump whenever the drawing or the layout changes: old datasets are then regenerated.
GENERATOR_VERSION = 1
# Bump whenever describe_person changes: caption pools are then regenerated.
CAPTION_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
POOL_IMAGE_DIR = "images"
CAPTIONS_NAME = "captions.json"


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
                raise RuntimeError(f"{dataset_dir} was written by another process meanwhile, with other contents "
                                   f"than these parameters give; remove it or use another root") from None
            manifest = current
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)   # no-op once renamed into place
    return manifest


def _param_changes(old, new):
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k))
