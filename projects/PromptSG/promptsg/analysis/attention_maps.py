"""Attention maps over the patch grid (the paper's Fig. 1 and 5) and how much of them a mask holds.

PromptSG: the MIM's text-query cross-attention over the patch tokens (Eq. 7), per head, for the
simplified prompt ("A photo of a person.") and the composed one ("A photo of a s* person."): the
weights of the first cross-attention block, whose query is the prompt embedding l_p itself
(``MultimodalInteraction.cross_attention_weights``: the very tensors the forward computes).

The CLIP baseline has no text query: its map is the attention rollout of the CLS token through
the visual transformer (``cls_attention_maps``, which also gives the last block's CLS attention) (Abnar and Zuidema, "Quantifying attention flow in transformers", 2020).
Per block the head-averaged attention A (N x N over [CLS; patches]) plus the residual connection,
0.5 A + 0.5 I, is multiplied through the blocks; the CLS row over the patches, normalised to sum
to one, is the map. It is read off the attention weights alone, like the cross-attention map it is
set beside; the gradient-weighted relevance of Chefer et al. (CVPR 2021) needs a scalar output to
explain, and a re-ID model's output is an embedding (its ID classifier covers training identities
only). The weights are recomputed from each block's own q/k projections of the inputs its
attention receives (a forward pre-hook), so the forward runs unchanged.

Maps live on the patch grid (gh, gw); token n covers the input pixels of its patch (``PatchGrid``:
size p, stride s, overlapping when s < p). ``mask_share`` is the attention mass inside a mask:
sum_n a_n c_n, with c_n the fraction of patch n the mask covers; a uniform map gets mean(c).
``pixel_density`` spreads a map back over its patches' pixels for drawing: the density whose
integral over a mask is that same share. ``compute_maps`` gives every map of a list of images by
one model, through FastReID's test transforms and loader as in evaluation (no flip).
"""
from contextlib import contextmanager
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from fastreid.data.build import build_reid_test_loader
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from open_clip.transformer import VisionTransformer
from torch import nn
from tqdm import tqdm

from ..modeling.clip_backbone import CLIPVisualBackbone
from ..modeling.interaction import MAP_FUSIONS


class PatchGrid(NamedTuple):
    """Where the tokens of a visual encoder sit: a (rows, cols) grid of patches of ``size``
    (h, w) pixels placed every ``stride`` (h, w) pixels over an ``image_size`` (H, W) input."""
    grid: Tuple[int, int]
    size: Tuple[int, int]
    stride: Tuple[int, int]
    image_size: Tuple[int, int]


def patch_grid(backbone: CLIPVisualBackbone) -> PatchGrid:
    """The patch grid of a CLIP visual backbone: ViT patches, or ModifiedResNet cells (each final
    feature-map position standing for its output-stride square of the input)."""
    visual = backbone.visual
    image_size = tuple(int(v) for v in visual.image_size)
    if backbone.is_vit:
        return PatchGrid(tuple(visual.grid_size), tuple(visual.patch_size), tuple(visual.conv1.stride), image_size)
    grid = tuple(visual.attnpool.grid_size)
    cell = (image_size[0] // grid[0], image_size[1] // grid[1])
    return PatchGrid(grid, cell, cell, image_size)


# ---- PromptSG: the MIM's cross-attention ----

class PromptSGMaps(NamedTuple):
    """Cross-attention of the MIM's first block over the patches, per head: (B, H, gh, gw) each;
    ``composed`` is None for a model without the inversion network f_theta. ``promptsg_read``: with
    a map fusion, v's attention over the patches in the MIM's last block under the simplified
    prompt's bias (renormalised over the patches, as the baseline's last block), None otherwise."""
    simplified: torch.Tensor
    composed: Optional[torch.Tensor]
    promptsg_read: Optional[torch.Tensor] = None


@torch.no_grad()
def promptsg_cross_attention(model, images, camids=None) -> PromptSGMaps:
    """The MIM's cross-attention maps of ``model`` (a PromptSG meta-architecture with a MIM) for
    ``images`` (B, 3, H, W) in FastReID's 0-255 units, with both test-time prompts."""
    mim = model.heads.mim
    visual = model.encode_visual(model.preprocess_image(images), camids)
    grid = patch_grid(model.backbone).grid
    maps = {}
    for name, composed in (("simplified", False), ("composed", True)):
        if composed and model.heads.inversion is None:
            maps[name] = None
            continue
        prompt = model.prompt_features(visual, composed)
        weights = mim.cross_attention_weights(prompt.query.to(visual.tokens.dtype), visual.tokens,
                                              visual.embedding, visual.log_cls_attention,
                                              visual.penultimate_tokens)[0]
        maps[name] = weights[:, prompt.out_index].unflatten(-1, grid)   # the pooled query's row: (B, H, gh, gw)
        if not composed and mim.fusion in MAP_FUSIONS:
            query = prompt.query[:, prompt.out_index:prompt.out_index + 1].to(visual.tokens.dtype)
            read = mim.read_attention_weights(query, visual.tokens, visual.embedding,
                                              visual.log_cls_attention,
                                              visual.penultimate_tokens)[-1][..., 1:]           # (B, H, M)
            maps["promptsg_read"] = (read / read.sum(dim=-1, keepdim=True)).unflatten(-1, grid)
    return PromptSGMaps(**maps)


# ---- the visual transformer: CLS attention rollout ----

def self_attention_weights(attn: nn.MultiheadAttention, q_x, k_x, attn_mask=None):
    """softmax(Q K^T / sqrt(d)) per head of a batch-first ``nn.MultiheadAttention`` on inputs
    q_x (B, N, E), k_x (B, S, E), from its own in-projection: (B, H, N, S)."""
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    heads, dim = attn.num_heads, attn.head_dim
    q = F.linear(q_x, w_q, b_q).unflatten(-1, (heads, dim)).transpose(1, 2)   # (B, H, N, d)
    k = F.linear(k_x, w_k, b_k).unflatten(-1, (heads, dim)).transpose(1, 2)   # (B, H, S, d)
    logits = q @ k.transpose(-1, -2) * dim ** -0.5
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(dim=-1)


@contextmanager
def recorded_attention(transformer):
    """Within the block, every forward of ``transformer`` (an open_clip Transformer, batch first)
    appends to the yielded list the attention weights (B, H, N, N) of each of its blocks, in order,
    recomputed from what each block's attention module receives."""
    if not getattr(transformer, "batch_first", True):
        raise ValueError("recorded_attention needs a batch-first open_clip Transformer")
    weights: List[torch.Tensor] = []

    def record(attn, args, kwargs):
        q_x, k_x = args[0], args[1]
        weights.append(self_attention_weights(attn, q_x, k_x, kwargs.get("attn_mask")))

    handles = [blk.attn.register_forward_pre_hook(record, with_kwargs=True) for blk in transformer.resblocks]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def attention_rollout(layer_weights):
    """CLS attention rollout (Abnar and Zuidema 2020) of per-block weights [(B, H, N, N), ...]
    (first block first; token 0 is CLS): the CLS row of prod_l (0.5 mean_h A_l + 0.5 I) over
    the N - 1 patches, normalised to sum to one: (B, N - 1)."""
    batch, _, tokens, _ = layer_weights[0].shape
    eye = torch.eye(tokens, dtype=layer_weights[0].dtype, device=layer_weights[0].device)
    rollout = eye.expand(batch, tokens, tokens)
    for weights in layer_weights:
        step = 0.5 * weights.mean(dim=1) + 0.5 * eye       # rows sum to one
        rollout = step @ rollout                            # later blocks act on earlier ones' output
    cls = rollout[:, 0, 1:]
    return cls / cls.sum(dim=-1, keepdim=True)


class CLSMaps(NamedTuple):
    """Where the CLS token of a visual transformer looks, (B, gh, gw) each, summing to one:
    ``rollout`` through every block, and ``last_block``, the last block's CLS attention over the
    patches (mean over heads, its mass on CLS itself left out)."""
    rollout: torch.Tensor
    last_block: torch.Tensor


@torch.no_grad()
def cls_attention_maps(model, images, camids=None) -> CLSMaps:
    """The CLS maps of ``model``'s CLIP ViT (a PromptSG meta-architecture, the CLIP baseline
    included) for ``images`` (B, 3, H, W) in FastReID's 0-255 units."""
    backbone = model.backbone
    if not isinstance(backbone, CLIPVisualBackbone) or not isinstance(backbone.visual, VisionTransformer):
        raise ValueError("attention rollout needs a CLIP ViT visual encoder (MODEL.CLIP.NAME of a ViT)")
    with recorded_attention(backbone.visual.transformer) as weights:
        backbone(model.preprocess_image(images), camids, with_tokens=False)
    last = weights[-1].mean(dim=1)[:, 0, 1:]                       # (B, M)
    grid = patch_grid(backbone).grid
    return CLSMaps(attention_rollout(weights).unflatten(-1, grid),
                   (last / last.sum(dim=-1, keepdim=True)).unflatten(-1, grid))


# ---- masks on the patch grid ----

def patch_coverage(mask, grid: PatchGrid):
    """The fraction of each patch a mask covers: ``mask`` (H, W) bool, or float coverage of each
    pixel, at the input size -> (gh, gw) float32 tensor."""
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    if tuple(mask.shape[-2:]) != grid.image_size:
        raise ValueError(f"mask of {tuple(mask.shape[-2:])} pixels for an input of {grid.image_size}")
    coverage = F.avg_pool2d(mask, kernel_size=grid.size, stride=grid.stride)[0, 0]
    if tuple(coverage.shape) != grid.grid:
        raise ValueError(f"patches of {grid.size} every {grid.stride} over {grid.image_size} give "
                         f"{tuple(coverage.shape)}, not the encoder's grid {grid.grid}")
    return coverage


def mask_share(maps, coverage):
    """Attention mass inside a mask: sum_n a_n c_n for maps (..., gh, gw) summing to one and the
    mask's patch coverage c (gh, gw) -> (...)."""
    return (maps * coverage).sum(dim=(-2, -1))


def pixel_density(maps, grid: PatchGrid):
    """A map (..., gh, gw) spread evenly over each patch's pixels: (..., H, W), summing to the
    map's sum; its sum over a mask's pixels is ``mask_share`` with that mask's coverage."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *grid.grid)
    kernel = torch.full((1, 1, *grid.size), 1.0 / (grid.size[0] * grid.size[1]), dtype=maps.dtype)
    density = F.conv_transpose2d(flat, kernel, stride=grid.stride)
    pad_h, pad_w = grid.image_size[0] - density.shape[-2], grid.image_size[1] - density.shape[-1]
    density = F.pad(density, (0, pad_w, 0, pad_h))            # pixels no patch reaches
    return density.reshape(*lead, *grid.image_size)


# ---- every image of a list, by one model ----

class ModelMaps(NamedTuple):
    """One model's maps of every image: ``maps`` name -> (N, H, gh, gw) per head (cross-attention)
    or (N, gh, gw) (rollout); ``images`` (N, 3, H, W) its inputs (uint8); ``coverages`` each
    image's person-mask coverage of the patches (gh, gw), None without a person."""
    cfg: object
    grid: PatchGrid
    maps: dict
    images: torch.Tensor
    coverages: list


def compute_maps(cfg, model, items, kind):
    """Every image's maps by one model, on its patch grid: the CLS rollout and last-block CLS
    attention of its encoder and, for ``kind`` "promptsg", the MIM's cross-attention per head with
    each prompt; and the model's input images."""
    test_set = CommDataset([(path, 0, camid) for path, camid in items], build_transforms(cfg, is_train=False),
                           relabel=False)
    loader = build_reid_test_loader(cfg, test_set=test_set, num_query=0,
                                    num_workers=cfg.DATALOADER.NUM_WORKERS)[0]
    sie = model.backbone.sie_embed is not None
    maps, images = {}, []
    for batch in tqdm(loader, desc=f"{kind} maps", unit="batch", disable=len(loader) < 3):
        camids = batch["camids"].to(model.device) if sie else None
        cls = cls_attention_maps(model, batch["images"], camids)
        prefix = "baseline" if kind == "baseline" else "promptsg_rollout"
        out = {prefix: cls.rollout, f"{kind}_last_block": cls.last_block}
        if kind == "promptsg":
            out.update(promptsg_cross_attention(model, batch["images"], camids)._asdict())
        for name, value in out.items():
            if value is not None:
                maps.setdefault(name, []).append(value.float().cpu())
        images.append(batch["images"].clamp(0, 255).round().to(torch.uint8))
    return {name: torch.cat(values) for name, values in maps.items()}, torch.cat(images)


def mask_at_input(mask, cfg):
    """A person mask (h, w) bool brought to the model's input as the test transforms bring the
    image (resize to INPUT.SIZE_TEST, centre crop if INPUT.CROP.ENABLED): (H, W) float, each input
    pixel's covered fraction (area resampling: exact box averages for integer scale factors)."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    size = list(cfg.INPUT.SIZE_TEST)
    if size[0] > 0:
        if len(size) == 1:       # torchvision's rule: the shorter side to that size
            h, w = m.shape[-2:]
            size = [size[0], round(size[0] * w / h)] if h > w else [round(size[0] * h / w), size[0]]
        m = F.interpolate(m, size=size, mode="area")
    if cfg.INPUT.CROP.ENABLED:
        m = TF.center_crop(m, list(cfg.INPUT.CROP.SIZE))
    return m[0, 0]


def head_mean(value):
    """A map averaged over its heads (a rollout map has none)."""
    return value.mean(dim=-3) if value.dim() >= 3 else value


def save_maps(path, items, results):
    """Every map of every image (``results``: model kind -> ModelMaps) and the images' paths, as
    one compressed .npz file."""
    arrays = {"paths": np.array([p for p, _ in items])}
    for res in results.values():
        arrays.update({name: value.numpy() for name, value in res.maps.items()})
    np.savez_compressed(path, **arrays)
