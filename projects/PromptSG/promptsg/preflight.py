"""Input checks run before any long work: each failure is one line naming the file, key or value.

``tools/train_net.py`` runs them before any process is spawned or any model is built: the config
(``load_config``, ``check_config``), the checkpoint and CLIP files (``check_weights``), the output
folder (``check_output_dir``) and every image of every dataset, decoded in full (``check_datasets``;
verified images are remembered by size and modification time, so a second start is quick).
"""
import concurrent.futures
import hashlib
import json
import os

from PIL import Image


class InputError(ValueError):
    """Bad user input: a missing file, an unknown config key, a corrupt image."""


def load_config(cfg, config_file, opts):
    """Merge ``config_file`` and the ``KEY VALUE`` overrides into ``cfg``, with one-line errors."""
    if not config_file:
        raise InputError("--config-file is required")
    if not os.path.isfile(config_file):
        raise InputError(f"config file not found: {config_file}")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as exc:
        raise InputError(f"{config_file}: {_key_message(exc)}") from None
    except Exception as exc:  # yaml syntax errors and type mismatches
        raise InputError(f"{config_file}: {' '.join(str(exc).split())}") from None
    if len(opts) % 2:
        raise InputError(f"command-line overrides must be KEY VALUE pairs, got {len(opts)} items: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as exc:
        raise InputError(f"command line: {_key_message(exc)}") from None
    except (ValueError, AssertionError) as exc:
        raise InputError(f"command line: {' '.join(str(exc).split())}") from None
    return cfg


def _key_message(exc):
    message = str(exc.args[0]) if exc.args else str(exc)
    if message.startswith("Non-existent config key: "):
        return "unknown config key " + message[len("Non-existent config key: "):]
    return message


# FastReID's distance metrics (fastreid.utils.compute_dist.build_dist) and the losses its
# meta-architectures read from MODEL.LOSSES.NAME (Baseline and MGN; PromptSG adds SupConLoss).
METRICS = ("cosine", "euclidean", "jaccard")
FASTREID_LOSSES = ("CrossEntropyLoss", "TripletLoss", "CircleLoss", "Cosface")


def check_config(cfg):
    """Values that FastReID or PromptSG would only reject at model build or at the final
    evaluation (after every epoch has trained): one line naming the key."""
    if cfg.TEST.METRIC not in METRICS:
        raise InputError(f"TEST.METRIC must be one of {list(METRICS)}, got {cfg.TEST.METRIC!r}")
    if cfg.MODEL.META_ARCHITECTURE == "PromptSG":
        from .clip_weights import ACTIVATIONS, _model_config
        from .config import validate_promptsg_config

        try:
            validate_promptsg_config(cfg)
            _model_config(cfg.MODEL.CLIP.NAME)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if cfg.MODEL.CLIP.ACTIVATION not in ACTIVATIONS:
            raise InputError(f"MODEL.CLIP.ACTIVATION must be one of {list(ACTIVATIONS)}, "
                             f"got {cfg.MODEL.CLIP.ACTIVATION!r}")
    else:
        unknown = [n for n in cfg.MODEL.LOSSES.NAME if n not in FASTREID_LOSSES]
        if unknown:
            raise InputError(f"MODEL.LOSSES.NAME: {unknown} not supported by {cfg.MODEL.META_ARCHITECTURE} "
                             f"(choose from {list(FASTREID_LOSSES)})")


def check_output_dir(path, what="OUTPUT_DIR"):
    """The output folder must be creatable and writable before training starts."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as exc:
        raise InputError(f"{what} {path} is not writable ({exc.strerror or exc})") from None


def check_weights(cfg, eval_only):
    """MODEL.WEIGHTS (and a local MODEL.CLIP.PRETRAINED) must exist before anything is built."""
    weights = cfg.MODEL.WEIGHTS
    if eval_only and not weights:
        raise InputError("--eval-only needs MODEL.WEIGHTS (a checkpoint written by training)")
    if weights and not os.path.isfile(weights):
        raise InputError(f"MODEL.WEIGHTS file not found: {weights}")
    if weights:
        check_torch_file(weights, "MODEL.WEIGHTS")
    if "CLIP" in cfg.MODEL:
        pretrained = cfg.MODEL.CLIP.PRETRAINED
        if pretrained and _looks_like_path(pretrained):
            if not os.path.isfile(pretrained):
                raise InputError(f"MODEL.CLIP.PRETRAINED file not found: {pretrained}")
            check_torch_file(pretrained, "MODEL.CLIP.PRETRAINED")


def check_torch_file(path, key):
    """An empty or truncated checkpoint fails here in one line, not in torch.load's traceback:
    ``torch.save`` and TorchScript archives are zip files, whose directory sits at the end, so a
    truncated one has none (checked without reading the tensors)."""
    if os.path.getsize(path) == 0:
        raise InputError(f"{key} {path} is an empty file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zip_directory_intact(path):
        raise InputError(f"{key} {path} is truncated or corrupt (its zip directory is missing or unreadable)")


def zip_directory_intact(path):
    """Whether the zip archive at ``path`` (a ``torch.save`` file) has a readable, non-empty
    directory: a kill or a full disk mid-write leaves none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.infolist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint_config(config_file, opts):
    """A PromptSG/FastReID config for a tool that reads a trained checkpoint: merged and checked
    like ``train_net.py --eval-only`` (MODEL.WEIGHTS required and present), not yet frozen."""
    from fastreid.config import get_cfg

    from .config import add_promptsg_config

    cfg = load_config(add_promptsg_config(get_cfg()), config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise InputError("MODEL.WEIGHTS is not set: give the trained checkpoint (MODEL.WEIGHTS FILE)")
    check_weights(cfg, eval_only=True)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    return cfg


def _looks_like_path(value):
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def check_datasets(cfg, root, verify_images=True, cache_dir=None):
    """Instantiate every train/test dataset (FastReID reports a missing folder) and decode every
    image in full, so a missing folder or a corrupt or truncated image fails here, naming it, and
    not mid-training or at the final evaluation."""
    from fastreid.data.datasets import DATASET_REGISTRY

    names = list(dict.fromkeys(list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS)))
    paths = []
    for name in names:
        if name not in DATASET_REGISTRY._obj_map:
            known = ", ".join(sorted(DATASET_REGISTRY._obj_map))
            raise InputError(f"unknown dataset {name!r} in DATASETS (known: {known})")
        try:
            dataset = DATASET_REGISTRY.get(name)(root=root)
        except (RuntimeError, AssertionError) as exc:  # check_before_run: '"<dir>" is not found'; MSMT17 asserts
            raise InputError(f"dataset {name}: {' '.join(str(exc).split())} "
                             f"(datasets root: {os.path.abspath(root)}, set FASTREID_DATASETS)") from None
        paths += [item[0] for item in dataset.train + dataset.query + dataset.gallery]
    if verify_images:
        verify_images_cached(list(dict.fromkeys(paths)), cache_dir)


def verify_image(path):
    """Raise InputError naming ``path`` if it is not an image that decodes in full. ``verify()``
    alone checks a PNG's chunks but never decodes a JPEG's data, so a truncated JPEG passed it;
    JPEGs are decoded at 1/8 scale (``draft``), which still reads every entropy-coded byte."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as exc:
        raise InputError(f"corrupt or unreadable image: {path} ({type(exc).__name__}: {exc})") from None


def _cache_file(cache_dir, paths):
    key = hashlib.sha1(os.path.abspath(os.path.dirname(paths[0]) if paths else "").encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"verified-images-{key}.json")


def default_cache_dir():
    """Where verified images are remembered: ``$PROMPTSG_CACHE_DIR``, else ``~/.cache/promptsg``."""
    return os.environ.get("PROMPTSG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "promptsg")


def verify_images_cached(paths, cache_dir=None, workers=None):
    """``verify_image`` over ``paths`` on a thread pool (PIL decodes without the GIL), skipping the
    files verified before with the same size and modification time (remembered in ``cache_dir``,
    default ``default_cache_dir()``; an unwritable cache only costs the time)."""
    if not paths:
        return
    cache_dir = cache_dir or default_cache_dir()
    cache_path = _cache_file(cache_dir, paths)
    try:
        with open(cache_path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise InputError(f"image listed by the dataset cannot be read: {path} ({exc.strerror})") from None
        stamps[path] = [st.st_size, st.st_mtime_ns]
    todo = [p for p in paths if known.get(os.path.abspath(p)) != stamps[p]]
    with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(verify_image, todo):
            pass
    known.update({os.path.abspath(p): stamps[p] for p in todo})
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"                  # processes of one run write in turn
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass
