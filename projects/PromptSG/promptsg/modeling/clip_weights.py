"""Creating an open_clip CLIP model and loading its weights for re-ID resolutions.

`create_clip_model` returns a full open_clip `CLIP` (visual and text towers) whose visual tower
works at a re-ID input size such as 256x128. Pretrained CLIP weights come at a square native
grid (14x14 for ViT-B/16 at 224, 7x7 for RN50): the positional embedding of the visual tower is
resized bilinearly to the new grid with its first row (CLS token for ViT, mean token for the
ModifiedResNet attention pool) kept, as CLIP-ReID does.

The tiny configs in projects/PromptSG/configs/clip ("tiny-ViT", "tiny-RN") are registered with
open_clip on import, for CPU tests.
"""
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

logger = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "clip"
open_clip.add_model_config(CLIP_CONFIG_DIR)

# Entries of OpenAI's TorchScript archives (and traced open_clip models) that are not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# The stride of open_clip's ModifiedResNet before layer4 (stem 4, then layer2 and layer3 at 2 each);
# layer4 adds its own stride: 2 as built (output stride 32), 1 with the re-ID "last stride 1" (16).
RESNET_STRIDE_BEFORE_LAYER4 = 16

Grid = Tuple[int, int]
ACTIVATIONS = ("", "quick_gelu", "gelu")  # the activation argument; "" = read it from the weights

# How create_clip_model's errors name its arguments: by themselves for a direct caller, by their
# config keys for a model built from a config (clip_model_from_config, config.validate_clip_towers).
ARGUMENTS = {a: a for a in ("name", "pretrained", "image_size", "patch_stride", "last_stride", "activation")}
CONFIG_KEYS = {
    "name": "MODEL.CLIP.NAME",
    "pretrained": "MODEL.CLIP.PRETRAINED",
    "image_size": "INPUT.SIZE_TRAIN",
    "patch_stride": "MODEL.CLIP.STRIDE",
    "last_stride": "MODEL.BACKBONE.LAST_STRIDE",
    "activation": "MODEL.CLIP.ACTIVATION",
}


class ArgumentMessage(Exception):
    """An error whose message names create_clip_model's arguments through ``{argument}`` fields
    of ``template`` (values through the other fields), so that ``naming(CONFIG_KEYS)`` gives the
    same error in the words of the config the arguments came from."""

    def __init__(self, template: str, names: Optional[Dict[str, str]] = None, **values):
        self.template, self.values = template, values
        super().__init__(template.format(**(names or ARGUMENTS), **values))

    def naming(self, names: Dict[str, str]) -> Exception:
        return type(self)(self.template, names, **self.values)


class ClipArgumentError(ArgumentMessage, ValueError):
    """A value create_clip_model cannot use (model name, weights, activation, strides)."""


class ClipFileNotFoundError(ArgumentMessage, FileNotFoundError):
    """``pretrained`` names a file that does not exist."""


class ClipDownloadError(ArgumentMessage, RuntimeError):
    """open_clip could not download the weights of a pretrained tag."""


def create_clip_model(
    name: str,
    pretrained: str = "",
    image_size: Sequence[int] = (256, 128),
    patch_stride: Optional[int] = None,
    last_stride: Optional[int] = None,
    activation: str = "",
) -> open_clip.CLIP:
    """Build open_clip model `name` in float32 with weights from `pretrained`, at `image_size`.

    Args:
        name: open_clip model name ("ViT-B-16", "RN50", "tiny-ViT", ...).
        pretrained: "" for random weights (logged loudly); a local file (OpenAI TorchScript
            archive, plain state dict with open_clip/OpenAI key names, or open_clip training
            checkpoint {"state_dict": ...} with optional "module." prefixes); or an open_clip
            pretrained tag such as "openai" (downloaded by open_clip, then loaded as a file).
        image_size: (H, W) the visual tower will see.
        patch_stride: ViT patch stride (None = patch size). Giving it here resizes the
            checkpoint's positional embedding once, straight to the final grid. ModifiedResNet
            towers ignore it.
        last_stride: stride of a ModifiedResNet's layer4, 1 or 2 (None: 2, as open_clip builds
            it); 1 is re-ID's "last stride 1" (output stride 16: a 16x8 map at 256x128), as in
            CLIP-ReID. ViT towers ignore it.

        activation: the MLP activation the weights were trained with, "quick_gelu" (OpenAI's
            CLIP) or "gelu"; "" reads it from the weights: QuickGELU for OpenAI TorchScript
            archives, the open_clip entry of a tag, the model name's config for random weights
            or a "-quickgelu" name. A plain state dict under any other name does not say, and
            is refused until ``activation`` names it: the wrong one silently shifts every feature.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    if activation not in ACTIVATIONS:
        raise ClipArgumentError("{activation} must be one of {choices}, got {value!r}",
                                choices=list(ACTIVATIONS), value=activation)
    forced = {"quick_gelu": True, "gelu": False}.get(activation)
    if not pretrained:
        model = _build_model(name, quick_gelu=forced, last_stride=last_stride)
        logger.warning(
            "\n" + "!" * 78 + "\n"
            f"!! No pretrained CLIP weights: CLIP model '{name}' starts from random weights.\n"
            "!! PromptSG needs a pretrained CLIP (its text tower stays frozen); training from\n"
            "!! random CLIP weights gives meaningless results. Give a tag such as 'openai' or a\n"
            "!! local CLIP checkpoint file (MODEL.CLIP.PRETRAINED in a config).\n" + "!" * 78
        )
        set_visual_resolution(model.visual, image_size, patch_stride)
        return model

    path, tag_quick_gelu = _resolve_pretrained(name, pretrained)
    state_dict, _ = read_clip_state_dict(path)
    quick_gelu, source = (forced, "as asked") if forced is not None else (
        weights_activation(name, path, tag_quick_gelu, pretrained))
    model = _build_model(name, quick_gelu=quick_gelu, last_stride=last_stride)
    _load_state_dict(model, state_dict, path, name, image_size, patch_stride)
    set_visual_resolution(model.visual, image_size, patch_stride)
    logger.info(f"Loaded CLIP weights for '{name}' from {path}, "
                f"{'QuickGELU' if quick_gelu else 'GELU'} activation ({source})")
    return model


def weights_activation(name: str, path: str, tag_quick_gelu: Optional[bool] = None,
                       tag: str = "") -> Tuple[bool, str]:
    """(QuickGELU or not, where that was read) for CLIP ``name``'s weights in the local file ``path``
    (downloaded for ``tag``, whose open_clip entry says ``tag_quick_gelu``): an OpenAI TorchScript
    archive, the tag's entry, or a "-quickgelu" model name. A plain state dict under any other
    name does not say: a ClipArgumentError asks for ``activation``. Reads no tensor."""
    if _is_torchscript_archive(path):
        return True, "an OpenAI TorchScript archive"
    if tag_quick_gelu is not None:
        return tag_quick_gelu, f"open_clip's entry for '{tag}'"
    if model_config(name).get("quick_gelu", False):
        return True, f"the model name '{name}'"
    raise ClipArgumentError(
        "{pretrained}={path} is a state dict that does not say which activation its CLIP was trained "
        "with: set {activation} quick_gelu (OpenAI's weights) or gelu (e.g. open_clip models trained "
        "with GELU)", path=path)


def clip_model_from_config(cfg) -> open_clip.CLIP:
    """``create_clip_model`` with its arguments read from a PromptSG config (MODEL.CLIP,
    INPUT.SIZE_TRAIN, MODEL.BACKBONE.LAST_STRIDE); its errors name those keys."""
    clip = cfg.MODEL.CLIP
    try:
        return create_clip_model(clip.NAME, clip.PRETRAINED, tuple(cfg.INPUT.SIZE_TRAIN), clip.STRIDE,
                                 cfg.MODEL.BACKBONE.LAST_STRIDE, clip.ACTIVATION)
    except ArgumentMessage as exc:
        raise exc.naming(CONFIG_KEYS) from None


def read_clip_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Read CLIP weights from a local file; returns (state_dict, is_torchscript_archive).

    TorchScript archives (OpenAI's original checkpoints) are read with torch.jit.load; every
    other format goes through open_clip's `load_state_dict` (safetensors, {"state_dict": ...},
    "module." prefixes) with weights_only=True.
    """
    is_torchscript = _is_torchscript_archive(path)
    try:
        if is_torchscript:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state_dict = load_state_dict(path, device="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClipArgumentError("Cannot read CLIP weights from {pretrained}={path}: {error}",
                                path=path, error=f"{type(e).__name__}: {first_line}") from e
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ClipArgumentError("{pretrained}={path} does not hold a CLIP state dict", path=path)
    state_dict = {k: v for k, v in state_dict.items() if k not in _NON_WEIGHT_KEYS}
    return state_dict, is_torchscript


def resize_grid_pos_embed(pos_embed: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    """Bilinearly resize a (1 + gh*gw, C) positional embedding to (1 + GH*GW, C).

    Row 0 (CLS / mean token) is kept as is; the rest is a row-major gh x gw grid, resized with
    F.interpolate(mode="bilinear", align_corners=False, no antialias) as CLIP-ReID does.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    resized = resample_abs_pos_embed(
        pos_embed.unsqueeze(0),  # (1, 1 + gh*gw, C)
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=1,
        interpolation="bilinear",
        antialias=False,
    )
    return resized.squeeze(0)  # (1 + GH*GW, C)


def pos_embed_grid(visual: nn.Module) -> Grid:
    """The (gh, gw) grid of the visual tower's positional embedding."""
    owner = _pos_embed_owner(visual)
    grid = getattr(owner, "grid_size", None)
    if grid is None:  # ModifiedResNet as open_clip builds it: square
        side = round((owner.positional_embedding.shape[0] - 1) ** 0.5)
        grid = (side, side)
    return tuple(grid)


def visual_grid(visual: nn.Module, image_size: Sequence[int], patch_stride: Optional[int] = None) -> Grid:
    """The token grid the visual tower produces for (H, W) images.

    ViT: ((H - P) // s + 1, (W - P) // s + 1) for patch size P and stride s (default P).
    ModifiedResNet: (H // S, W // S) for its output stride S (32, or 16 with last stride 1);
    H and W must be multiples of S.
    """
    height, width = image_size
    if isinstance(visual, VisionTransformer):
        patch_h, patch_w = visual.patch_size
        stride = patch_stride or patch_h
        if not 0 < stride <= min(patch_h, patch_w):
            raise ClipArgumentError("{patch_stride} must be in [1, {patch}] (the ViT's patch size), got {value}",
                                    patch=min(patch_h, patch_w), value=stride)
        return ((height - patch_h) // stride + 1, (width - patch_w) // stride + 1)
    _pos_embed_owner(visual)  # type check
    stride = resnet_output_stride(visual)
    if height % stride or width % stride:
        raise ClipArgumentError("{image_size} {size} must be divisible by {stride}, the output stride of the "
                                "ModifiedResNet", size=list(image_size), stride=stride)
    return (height // stride, width // stride)


def resnet_output_stride(visual: ModifiedResNet) -> int:
    """Output stride of a ModifiedResNet: 16 times the stride of its layer4."""
    return RESNET_STRIDE_BEFORE_LAYER4 * visual.layer4[0].stride


def set_resnet_last_stride(visual: ModifiedResNet, stride: int) -> None:
    """Run a ModifiedResNet's layer4 at ``stride`` (1 or 2), in place; parameters are unchanged.

    open_clip's Bottleneck downsamples with a 2x2 average pool on both branches (after conv2,
    and before the 1x1 projection of the shortcut); stride 1 replaces both pools by identities.
    """
    if stride not in (1, 2):
        raise ClipArgumentError("{last_stride} must be 1 or 2 for a CLIP ModifiedResNet, got {value}", value=stride)
    block = visual.layer4[0]
    pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
    block.avgpool = pool
    block.downsample[0] = pool                   # the shortcut's pool, named "-1" in the checkpoint
    block.stride = stride


def set_visual_resolution(
    visual: nn.Module, image_size: Sequence[int], patch_stride: Optional[int] = None
) -> None:
    """Make an open_clip visual tower work at (H, W) images, in place.

    ViT: sets the patch-embedding conv stride (None = patch size; smaller = overlapping
    patches) and resizes the positional embedding to the resulting grid. ModifiedResNet: resizes
    the attention-pool positional embedding to (H/32, W/32) (patch_stride is ignored). The
    positional-embedding parameter is replaced (requires_grad kept) only if the grid changes;
    the grid is recorded as `grid_size` on its owner (the ViT, or the RN's attnpool).
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    new_grid = visual_grid(visual, image_size, patch_stride)
    if isinstance(visual, VisionTransformer):
        stride = patch_stride or visual.patch_size[0]
        visual.conv1.stride = (stride, stride)
    old_grid = pos_embed_grid(visual)
    if old_grid != new_grid:
        pos_embed = _pos_embed_owner(visual).positional_embedding.detach()
        _set_pos_embed(visual, resize_grid_pos_embed(pos_embed, old_grid, new_grid), new_grid)
    _pos_embed_owner(visual).grid_size = new_grid
    visual.image_size = image_size


def _pos_embed_owner(visual: nn.Module) -> nn.Module:
    """The module holding the grid positional embedding: the ViT itself or the RN attention pool."""
    if isinstance(visual, VisionTransformer):
        return visual
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool
    raise TypeError(
        f"Expected an open_clip VisionTransformer or ModifiedResNet visual tower, got {type(visual).__name__}"
    )


def _pos_embed_key(visual: nn.Module) -> str:
    return "visual.positional_embedding" if isinstance(visual, VisionTransformer) else (
        "visual.attnpool.positional_embedding"
    )


def _set_pos_embed(visual: nn.Module, pos_embed: torch.Tensor, grid: Grid) -> None:
    """Replace the grid positional embedding (1 + gh*gw, C) and record its grid."""
    owner = _pos_embed_owner(visual)
    old = owner.positional_embedding
    owner.positional_embedding = nn.Parameter(pos_embed.to(old.dtype), requires_grad=old.requires_grad)
    owner.grid_size = tuple(grid)


def model_config(name: str) -> dict:
    """open_clip's config dict of model ``name`` (a copy), or a ClipArgumentError naming it."""
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ClipArgumentError("{name}={value!r} is not an open_clip model config "
                                "(e.g. ViT-B-16, RN50, tiny-ViT, tiny-RN)", value=name)
    return model_cfg


def _build_model(name: str, quick_gelu: Optional[bool], last_stride: Optional[int] = None) -> open_clip.CLIP:
    """open_clip CLIP ``name``; quick_gelu None keeps the activation of the name's config."""
    model_cfg = model_config(name)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if model_cfg.pop("custom_text", False) or "timm_model_name" in vision_cfg or "hf_model_name" in text_cfg:
        raise ClipArgumentError("{name}={value!r} is not a standard CLIP (OpenAI-style ViT or ModifiedResNet "
                                "visual tower with a CLIP text transformer)", value=name)
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    model = open_clip.CLIP(**model_cfg)  # float32, random init
    _pos_embed_owner(model.visual)  # type check
    if last_stride is not None and isinstance(model.visual, ModifiedResNet):
        set_resnet_last_stride(model.visual, last_stride)
    return model


def _resolve_pretrained(name: str, pretrained: str) -> Tuple[str, Optional[bool]]:
    """Turn ``pretrained`` into a local file; returns (path, QuickGELU or not for a tag,
    None for a file)."""
    path = os.path.expanduser(pretrained)
    if os.path.isfile(path):
        return path, None
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise ClipFileNotFoundError("{pretrained}={value}: no such file", value=pretrained)
    pretrained_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ClipArgumentError("{pretrained}={value!r} is neither a file nor an open_clip pretrained tag "
                                "of {model!r} (tags: {tags})", value=pretrained, model=name, tags=tags)
    try:
        path = open_clip.download_pretrained(pretrained_cfg)
    except Exception as e:
        raise ClipDownloadError(
            "Could not download open_clip weights {tag!r} for {model!r} ({error}); without network access "
            "set {pretrained} to a local file (OpenAI TorchScript archive, state dict or open_clip checkpoint)",
            tag=pretrained, model=name, error=type(e).__name__) from e
    return path, bool(pretrained_cfg.get("quick_gelu", False))


def _is_torchscript_archive(path: str) -> bool:
    # torch.save zips hold <archive>/data.pkl; TorchScript ones also <archive>/constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def _checkpoint_grid(num_positions: int, candidates: Sequence[Grid], path: str) -> Grid:
    """The grid of a checkpoint's (1 + gh*gw, C) positional embedding.

    A grid with the right number of positions among `candidates` (the model's current and
    target grids) wins; otherwise the grid must be square (as pretrained CLIP checkpoints are).
    """
    for grid in candidates:
        if grid[0] * grid[1] == num_positions - 1:
            return tuple(grid)
    side = round((num_positions - 1) ** 0.5)
    if side * side != num_positions - 1:
        raise ClipArgumentError("Cannot infer the positional-embedding grid of {positions} positions in "
                                "{pretrained}={path}", positions=num_positions - 1, path=path)
    return (side, side)


def _load_state_dict(
    model: open_clip.CLIP,
    state_dict: Dict[str, torch.Tensor],
    path: str,
    name: str,
    image_size: Grid,
    patch_stride: Optional[int],
) -> None:
    """Load `state_dict` strictly; the visual positional embedding may have any grid."""
    pos_key = _pos_embed_key(model.visual)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
        and not (k == pos_key and v.ndim == 2 and v.shape[1] == expected[k].shape[1])
    ]
    if missing or unexpected or mismatched:
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for label, keys in found
            if keys
        ]
        raise ClipArgumentError("{pretrained}={path} does not match open_clip model {model!r}: {problems}",
                                path=path, model=name, problems="; ".join(problems))
    # Give the model the checkpoint's grid so that the load is exact; set_visual_resolution
    # then resizes once, from the checkpoint grid to the final one.
    candidates = (pos_embed_grid(model.visual), visual_grid(model.visual, image_size, patch_stride))
    ckpt_grid = _checkpoint_grid(state_dict[pos_key].shape[0], candidates, path)
    if ckpt_grid != candidates[0]:
        _set_pos_embed(model.visual, torch.empty(state_dict[pos_key].shape), ckpt_grid)
    model.load_state_dict(state_dict, strict=True)
