"""What the attention maps are drawn from (tools/attention_maps.py), checked in one line each
before any model is built: PromptSG's config and the CLIP baseline's, and the images with their
cameras (a dataset's test split, or image files and folders)."""
import os

from fastreid.data.datasets import DATASET_REGISTRY


from ..engine.checkpoint import load_for_inference
from ..engine.preflight import InputError, check_config, load_checkpoint_config, sie_camera, verify_image
from ..modeling.clip_weights import model_config
from ..engine.trainer import Trainer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def model_configs(config_file, opts, baseline_config=None, baseline_weights=None, images=False, camera=None):
    """PromptSG's config (and the baseline's: ``baseline_config`` with ``baseline_weights``), with the
    ``KEY VALUE`` overrides ``opts``, checked as ``train_net.py --eval-only`` checks them; ``images``:
    the maps are of given images, whose camera is ``camera`` (models with SIE need it)."""
    cfg = load_checkpoint_config(config_file, opts)
    if cfg.MODEL.META_ARCHITECTURE != "PromptSG" or cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS < 1:
        raise InputError(f"{config_file}: not a PromptSG model with a MIM (MODEL.META_ARCHITECTURE "
                         f"{cfg.MODEL.META_ARCHITECTURE}, MODEL.PROMPTSG.MIM.CROSS_LAYERS "
                         f"{cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS}); give the baseline as --baseline-config")
    cfgs = {"promptsg": cfg}
    if baseline_config:
        base_opts = without_key(opts, "MODEL.WEIGHTS") + ["MODEL.WEIGHTS", baseline_weights]
        base = load_checkpoint_config(baseline_config, base_opts)
        if base.MODEL.META_ARCHITECTURE != "PromptSG" or base.MODEL.BACKBONE.NAME != "build_clip_backbone":
            raise InputError(f"{baseline_config}: not a CLIP model of this project "
                             f"(MODEL.META_ARCHITECTURE {base.MODEL.META_ARCHITECTURE})")
        cfgs["baseline"] = base
    for path, c in zip((config_file, baseline_config), cfgs.values()):
        check_model(c, path, images, camera)
        c.freeze()
    return cfgs


def check_model(cfg, path, images=False, camera=None):
    """The config's values as train_net.py checks them; maps need a CLIP ViT (the rollout walks its
    blocks); an SIE model needs the images' camera."""
    check_config(cfg)
    layers = model_config(cfg.MODEL.CLIP.NAME).get("vision_cfg", {}).get("layers")
    if not isinstance(layers, int):
        raise InputError(f"{path}: MODEL.CLIP.NAME {cfg.MODEL.CLIP.NAME} is not a ViT; the attention maps "
                         f"need a CLIP ViT visual encoder")
    if images:
        try:
            sie_camera(cfg, camera)
        except InputError as exc:
            raise InputError(f"{path}: {exc} (the camera the --images get)") from None


def without_key(opts, key):
    """``KEY VALUE`` overrides less those of ``key``."""
    pairs = list(zip(opts[::2], opts[1::2]))
    return [item for k, v in pairs if k != key for item in (k, v)]


def list_items(dataset=None, images=(), camera=None):
    """[(image path, camera id)] to map: the test split (query + gallery) of ``dataset`` under
    $FASTREID_DATASETS, else the ``images`` (files or folders of images) with ``camera``; checked
    (missing paths, unreadable images) in one line."""
    if dataset:
        if dataset not in DATASET_REGISTRY._obj_map:
            raise InputError(f"--dataset: unknown dataset {dataset!r} (known: "
                             f"{', '.join(sorted(DATASET_REGISTRY._obj_map))})")
        root = os.getenv("FASTREID_DATASETS", "datasets")
        try:
            split = DATASET_REGISTRY.get(dataset)(root=root)
        except (RuntimeError, AssertionError) as exc:
            raise InputError(f"--dataset {dataset}: {' '.join(str(exc).split())} "
                             f"(datasets root: {os.path.abspath(root)}, set FASTREID_DATASETS)") from None
        return [(path, camid) for path, _, camid in split.query + split.gallery]
    paths = []
    for path in images:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                           if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InputError(f"--images: no {'/'.join(IMAGE_EXTENSIONS)} image under {path}")
            paths += found
        elif os.path.isfile(path):
            paths.append(path)
        else:
            raise InputError(f"--images: no such file or folder: {path}")
    for path in paths:
        verify_image(path)
    return [(path, camera or 0) for path in paths]


def build_model(cfg):
    """The model of ``cfg`` with its checkpoint MODEL.WEIGHTS loaded, in eval mode."""
    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    return model.eval()
