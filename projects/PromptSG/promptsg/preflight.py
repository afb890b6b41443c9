"""Input checks run before any long work: each failure is one line naming the file, key or value."""
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


def check_weights(cfg, eval_only):
    """MODEL.WEIGHTS (and a local MODEL.CLIP.PRETRAINED) must exist before anything is built."""
    weights = cfg.MODEL.WEIGHTS
    if eval_only and not weights:
        raise InputError("--eval-only needs MODEL.WEIGHTS (a checkpoint written by training)")
    if weights and not os.path.isfile(weights):
        raise InputError(f"MODEL.WEIGHTS file not found: {weights}")
    if "CLIP" in cfg.MODEL:
        pretrained = cfg.MODEL.CLIP.PRETRAINED
        if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
            raise InputError(f"MODEL.CLIP.PRETRAINED file not found: {pretrained}")


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


def check_datasets(cfg, root, verify_images=True):
    """Instantiate every train/test dataset (FastReID reports a missing folder) and open every
    image header, so a missing folder or a corrupt image fails here and not mid-training."""
    from fastreid.data.datasets import DATASET_REGISTRY

    names = list(dict.fromkeys(list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS)))
    for name in names:
        if name not in DATASET_REGISTRY._obj_map:
            known = ", ".join(sorted(DATASET_REGISTRY._obj_map))
            raise InputError(f"unknown dataset {name!r} in DATASETS (known: {known})")
        try:
            dataset = DATASET_REGISTRY.get(name)(root=root)
        except RuntimeError as exc:  # FastReID's check_before_run: '"<dir>" is not found'
            raise InputError(f"dataset {name}: {' '.join(str(exc).split())} "
                             f"(datasets root: {os.path.abspath(root)}, set FASTREID_DATASETS)") from None
        if verify_images:
            for item in dataset.train + dataset.query + dataset.gallery:
                verify_image(item[0])


def verify_image(path):
    """Raise InputError naming ``path`` if it is not a readable image."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:
        raise InputError(f"corrupt or unreadable image: {path} ({type(exc).__name__})") from None
