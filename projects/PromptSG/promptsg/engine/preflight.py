"""Input checks run before any long work: each failure is one line naming the file, key or value.

``tools/train_net.py`` runs them before any process is spawned or any model is built: the config
(``load_config``, ``check_config``), the checkpoint and CLIP files (``check_weights``), the output
folder (``check_output_dir``) and every image of every dataset, decoded in full (``check_datasets``;
verified images are remembered by size and modification time, so a second start is quick).
"""
import concurrent.futures
import hashlib
import json
import math
import os
import zipfile

import yaml
from fastreid.config import get_cfg
from PIL import Image

from ..config import CLIP_ARCHITECTURES, add_promptsg_config, validate_clipreid_config, validate_promptsg_config
from ..data.real_datasets import check_real_dataset
from ..modeling.clip_weights import CONFIG_KEYS, ClipArgumentError, weights_activation
from ..utils.errors import InputError  # noqa: F401  (raised here; imported from here by the tools)


def load_config(cfg, config_file, opts):
    """Merge ``config_file`` and the ``KEY VALUE`` overrides into ``cfg``, with one-line errors."""
    if not config_file:
        raise InputError("--config-file is required")
    if not os.path.isfile(config_file):
        raise InputError(f"config file not found: {config_file}")
    check_duplicate_keys(config_file)
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


def check_duplicate_keys(config_file):
    """Refuse a YAML config (or one of its ``_BASE_`` files) that sets a key twice at any level:
    YAML loaders keep the last value silently, so a second ``SOLVER:`` section replaces the first
    whole. One line names the file, the dotted key and both lines."""
    def walk(node, prefix):
        if not isinstance(node, yaml.MappingNode):
            for child in node.value if isinstance(node, yaml.SequenceNode) else ():
                walk(child, prefix)
            return
        first = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in first:
                raise InputError(f"{config_file}: duplicate key {prefix}{key} (lines {first[key]} and {line}); "
                                 f"YAML would keep only the last")
            first[key] = line
            walk(value_node, f"{prefix}{key}.")

    try:
        with open(config_file) as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return   # a syntax error: FastReID's loader reports it, with its position
    if root is None:
        return
    walk(root, "")
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == "_BASE_" and isinstance(value_node, yaml.ScalarNode):
                base = os.path.expanduser(value_node.value)
                if not base.startswith(("/", "https://", "http://")):   # FastReID's rule: relative to the file
                    base = os.path.join(os.path.dirname(config_file), base)
                if os.path.isfile(base):
                    check_duplicate_keys(base)


def _key_message(exc):
    message = str(exc.args[0]) if exc.args else str(exc)
    if message.startswith("Non-existent config key: "):
        return "unknown config key " + message[len("Non-existent config key: "):]
    return message


# FastReID's distance metrics (fastreid.utils.compute_dist.build_dist) and the losses its
# meta-architectures read from MODEL.LOSSES.NAME (Baseline and MGN; PromptSG adds SupConLoss).
METRICS = ("cosine", "euclidean", "jaccard")
FASTREID_LOSSES = ("CrossEntropyLoss", "TripletLoss", "CircleLoss", "Cosface")


# FastReID's samplers that draw NUM_INSTANCE images of each identity into a batch.
IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler", "SetReWeightSampler")


def check_ranges(cfg, processes=1):
    """Numbers FastReID takes without a check and fails on later (an epoch count of 0 fails after
    "Starting training" with an AttributeError): one line naming the key and its value."""
    def need(ok, message):
        if not ok:
            raise InputError(message)

    solver, loader = cfg.SOLVER, cfg.DATALOADER
    need(solver.MAX_EPOCH >= 1, f"SOLVER.MAX_EPOCH must be >= 1, got {solver.MAX_EPOCH}")
    need(solver.BASE_LR > 0 and math.isfinite(solver.BASE_LR), f"SOLVER.BASE_LR must be > 0, got {solver.BASE_LR}")
    need(solver.IMS_PER_BATCH >= 1, f"SOLVER.IMS_PER_BATCH must be >= 1, got {solver.IMS_PER_BATCH}")
    need(solver.CHECKPOINT_PERIOD >= 1, f"SOLVER.CHECKPOINT_PERIOD must be >= 1 (epochs), got {solver.CHECKPOINT_PERIOD}")
    need(cfg.TEST.EVAL_PERIOD >= 1, f"TEST.EVAL_PERIOD must be >= 1 (epochs), got {cfg.TEST.EVAL_PERIOD}")
    need(cfg.TEST.IMS_PER_BATCH >= 1, f"TEST.IMS_PER_BATCH must be >= 1, got {cfg.TEST.IMS_PER_BATCH}")
    need(cfg.TEST.QUERY_CHUNK >= 0, f"TEST.QUERY_CHUNK must be >= 0 (0: FastReID's dense evaluation), "
                                    f"got {cfg.TEST.QUERY_CHUNK}")
    if cfg.TEST.RERANK.ENABLED:
        rerank = cfg.TEST.RERANK
        need(1 <= rerank.K2 <= rerank.K1, f"TEST.RERANK needs 1 <= K2 <= K1, got K1 {rerank.K1} and K2 {rerank.K2}")
        need(0 <= rerank.LAMBDA <= 1, f"TEST.RERANK.LAMBDA must be in [0, 1], got {rerank.LAMBDA}")
    need(loader.NUM_WORKERS >= 0, f"DATALOADER.NUM_WORKERS must be >= 0, got {loader.NUM_WORKERS}")
    need(solver.WARMUP_ITERS >= 0, f"SOLVER.WARMUP_ITERS must be >= 0, got {solver.WARMUP_ITERS}")
    if loader.SAMPLER_TRAIN in IDENTITY_SAMPLERS:
        need(loader.NUM_INSTANCE >= 1, f"DATALOADER.NUM_INSTANCE must be >= 1, got {loader.NUM_INSTANCE}")
        need(solver.IMS_PER_BATCH % loader.NUM_INSTANCE == 0,
             f"SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH} must be divisible by DATALOADER.NUM_INSTANCE "
             f"{loader.NUM_INSTANCE} ({loader.SAMPLER_TRAIN} draws NUM_INSTANCE images per identity)")
    need(solver.IMS_PER_BATCH % processes == 0,
         f"SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH} must be divisible by the number of processes {processes} "
         f"(--num-gpus x --num-machines)")
    for key in ("SIZE_TRAIN", "SIZE_TEST"):
        size = list(cfg.INPUT[key])
        need(len(size) == 2 and min(size) >= 1, f"INPUT.{key} must be [height, width] >= 1, got {size}")


def check_config(cfg, processes=1):
    """Values that FastReID or PromptSG would only reject at model build or at the final
    evaluation (after every epoch has trained): one line naming the key. ``processes``: the
    run's number of processes (--num-gpus x --num-machines)."""
    check_ranges(cfg, processes)
    if cfg.TEST.METRIC not in METRICS:
        raise InputError(f"TEST.METRIC must be one of {list(METRICS)}, got {cfg.TEST.METRIC!r}")
    if cfg.MODEL.META_ARCHITECTURE in CLIP_ARCHITECTURES:
        validate = validate_promptsg_config if cfg.MODEL.META_ARCHITECTURE == "PromptSG" else validate_clipreid_config
        try:
            validate(cfg)   # MODEL.CLIP, the image size against the tower and the model's own keys
        except ValueError as exc:
            raise InputError(str(exc)) from None
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


def sie_camera(cfg, camera, flag="--camera"):
    """The camera index a model's images get: ``camera`` for a model with SIE
    (MODEL.CLIP.SIE_CAMERA), which must be a training camera (0..NUM_CAMERAS - 1), else 0. ``flag``:
    how the caller names ``camera`` in the error (``--camera``, ``camera=``)."""
    if "CLIP" not in cfg.MODEL or not cfg.MODEL.CLIP.SIE_CAMERA:
        return 0
    cameras = cfg.MODEL.CLIP.NUM_CAMERAS
    if camera is None or not 0 <= camera < cameras:
        raise InputError(f"MODEL.CLIP.SIE_CAMERA is on: give {flag}, a training camera index in 0..{cameras - 1} "
                         f"(got {camera})")
    return camera


def check_weights(cfg, eval_only):
    """MODEL.WEIGHTS (and a local MODEL.CLIP.PRETRAINED) must exist before anything is built."""
    weights = cfg.MODEL.WEIGHTS
    if eval_only and not weights:
        raise InputError("--eval-only needs MODEL.WEIGHTS (a checkpoint written by training)")
    if weights and os.path.isdir(weights):
        found = sorted(n for n in os.listdir(weights) if n.endswith((".pth", ".pt")))
        raise InputError(f"MODEL.WEIGHTS {weights} is a folder, not a checkpoint file: "
                         + (f"give one of its checkpoints ({', '.join(found[:5])}{' ...' if len(found) > 5 else ''})"
                            if found else "it holds no .pth or .pt file"))
    if weights and not os.path.isfile(weights):
        raise InputError(f"MODEL.WEIGHTS file not found: {weights}")
    if weights:
        check_torch_file(weights, "MODEL.WEIGHTS")
    stage1 = cfg.MODEL.CLIPREID.STAGE1_WEIGHTS if cfg.MODEL.META_ARCHITECTURE == "CLIPReID" else ""
    if stage1 and not os.path.isfile(stage1):
        raise InputError(f"MODEL.CLIPREID.STAGE1_WEIGHTS file not found: {stage1}")
    if stage1:
        check_torch_file(stage1, "MODEL.CLIPREID.STAGE1_WEIGHTS")
    if "CLIP" in cfg.MODEL:
        pretrained = cfg.MODEL.CLIP.PRETRAINED
        if pretrained and _looks_like_path(pretrained):
            if not os.path.isfile(pretrained):
                raise InputError(f"MODEL.CLIP.PRETRAINED file not found: {pretrained}")
            check_torch_file(pretrained, "MODEL.CLIP.PRETRAINED")
            # Weights that do not say QuickGELU or GELU: checked here for torch.save's zip archives
            # (other formats when the model reads them).
            if not cfg.MODEL.CLIP.ACTIVATION and zipfile.is_zipfile(pretrained):
                try:
                    weights_activation(cfg.MODEL.CLIP.NAME, pretrained)
                except ClipArgumentError as exc:
                    raise InputError(str(exc.naming(CONFIG_KEYS))) from None


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
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.infolist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint_config(config_file, opts):
    """A PromptSG/FastReID config for a tool that reads a trained checkpoint: merged and checked
    like ``train_net.py --eval-only`` (MODEL.WEIGHTS required and present), not yet frozen."""
    cfg = load_config(add_promptsg_config(get_cfg()), config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise InputError("MODEL.WEIGHTS is not set: give the trained checkpoint (MODEL.WEIGHTS FILE)")
    check_weights(cfg, eval_only=True)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    return cfg


def _looks_like_path(value):
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def check_datasets(cfg, root, verify_images=True, cache_dir=None):
    """Check the real datasets' layouts (``data.real_datasets``), instantiate every train/test
    dataset (FastReID reports a missing folder; CUHK03 converts its .mat files here on first use)
    and decode every image in full, so a slip in a folder or a corrupt or truncated image fails
    here, naming it, and not mid-training or at the final evaluation."""
    from fastreid.data.datasets import DATASET_REGISTRY

    names = list(dict.fromkeys(list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS)))
    paths = []
    for name in names:
        if name not in DATASET_REGISTRY._obj_map:
            known = ", ".join(sorted(DATASET_REGISTRY._obj_map))
            raise InputError(f"unknown dataset {name!r} in DATASETS (known: {known})")
        check_real_dataset(name, root, cfg.DATASETS.COMBINEALL)
        try:
            dataset = DATASET_REGISTRY.get(name)(root=root, combineall=cfg.DATASETS.COMBINEALL)
        except (RuntimeError, AssertionError) as exc:  # check_before_run: '"<dir>" is not found'
            raise InputError(f"dataset {name}: {' '.join(str(exc).split())} "
                             f"(datasets root: {os.path.abspath(root)}, set FASTREID_DATASETS)") from None
        if name in cfg.DATASETS.NAMES and not dataset.train:
            raise InputError(f"dataset {name}: no training images in {_split_dir(dataset, 'train')}")
        if name in cfg.DATASETS.TESTS:
            check_test_split(name, dataset)
        paths += [item[0] for item in dataset.train + dataset.query + dataset.gallery]
    if verify_images:
        verify_images_cached(list(dict.fromkeys(paths)), cache_dir)


def _split_dir(dataset, split):
    """The folder a FastReID dataset read ``split`` from (Market-1501 layout names), else its root."""
    folder = getattr(dataset, f"{split}_dir", None) or getattr(dataset, "dataset_dir", None)
    return folder if isinstance(folder, str) else "its folder"


def valid_queries(query, gallery):
    """How many queries FastReID's protocol can evaluate: those with a gallery image of their
    identity from another camera (its ranking leaves out the same identity's same-camera images
    and skips a query with no match left)."""
    cameras = {}
    for _, pid, camid in gallery:
        cameras.setdefault(pid, set()).add(camid)
    return sum(bool(cameras.get(pid, set()) - {camid}) for _, pid, camid in query)


def check_test_split(name, dataset):
    """A test split that the final evaluation cannot score fails here, not after the last epoch
    (FastReID's ranker asserts "all query identities do not appear in gallery")."""
    for split in ("query", "gallery"):
        if not getattr(dataset, split):
            raise InputError(f"dataset {name}: no {split} images in {_split_dir(dataset, split)}")
    if not valid_queries(dataset.query, dataset.gallery):
        raise InputError(f"dataset {name}: none of the {len(dataset.query)} queries in "
                         f"{_split_dir(dataset, 'query')} has a gallery image of its identity from another camera "
                         f"in {_split_dir(dataset, 'gallery')}: nothing to evaluate")


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
