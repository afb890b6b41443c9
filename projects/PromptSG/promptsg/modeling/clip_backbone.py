"""CLIP's visual encoder as a FastReID backbone (PromptSG Sec. 4, CLIP-ReID style).

`CLIPVisualBackbone` runs an open_clip visual tower (VisionTransformer or ModifiedResNet) and
returns, besides CLIP's global image embedding v, the patch embeddings in the same joint space
(keys/values of PromptSG's multimodal interaction module) and the three global states the
triplet loss uses.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from ..config import validate_clip_towers
from .clip_weights import clip_model_from_config, set_visual_resolution
from .interaction import few_query_attention_weights


class CLIPVisualOutput(NamedTuple):
    """What the visual encoder gives PromptSG.

    embedding: (B, E) global image embedding v in CLIP's joint space (= CLIP encode_image).
    tokens: (B, M, E) one embedding per spatial position, in the same joint space; None when
        not asked for (``with_tokens=False``: a model without MIM skips their projection).
    states: three global states for the triplet loss, as CLIP-ReID's [x11, x12, proj]:
        ViT: [CLS after the second-to-last block (B, C), ln_post(CLS) (B, C), embedding (B, E)];
        RN:  [GAP of layer3 (B, C/2), GAP of layer4 (B, C), embedding (B, E)].
    log_cls_attention: (B, M) log of where the ViT's CLS token looks in its last block: the head
        mean of its attention weights over the M patches, renormalised over them. Only when asked
        for (``with_cls_attention``); the prior of the MIM's map (MODEL.PROMPTSG.MIM.MAP_PRIOR).
    penultimate_tokens: (B, M, E) the patch tokens before the ViT's last block, taken to the joint
        space as the final ones are (ln_post, proj). Only when asked for (``with_penultimate_tokens``);
        the keys of the MIM's map under MODEL.PROMPTSG.MIM.MAP_KEYS penultimate.
    """
    embedding: torch.Tensor
    tokens: Optional[torch.Tensor]
    states: List[torch.Tensor]
    log_cls_attention: Optional[torch.Tensor] = None
    penultimate_tokens: Optional[torch.Tensor] = None

    def rows(self, index):
        """The outputs of the images at ``index`` (a (K,) long tensor)."""
        pick = (lambda t: None if t is None else t[index])
        return CLIPVisualOutput(self.embedding[index], pick(self.tokens), [s[index] for s in self.states],
                                pick(self.log_cls_attention), pick(self.penultimate_tokens))


class CLIPVisualBackbone(nn.Module):
    """open_clip visual tower at a re-ID resolution, with overlapping patches and SIE.

    Args:
        visual: open_clip VisionTransformer or ModifiedResNet; modified in place (patch stride,
            positional-embedding grid) and owned by this module from then on.
        image_size: (H, W) of the input images.
        stride: ViT patch stride; None = patch size, smaller = overlapping patches (CLIP-ReID).
            ModifiedResNet ignores it: its output stride is set when the model is created
            (``create_clip_model(last_stride=...)``).
        num_cameras: > 0 adds SIE, a learnable per-camera embedding (N_cam, C), truncated-normal
            init with std 0.02, added to the CLS token after the position embedding (ViT only).
        sie_coe: scale of the SIE camera embedding.

    Attributes:
        out_dim: E, CLIP's joint embedding width.
        width: C, the transformer width (ViT) or the last-stage channels (RN).
    """

    def __init__(
        self,
        visual: nn.Module,
        image_size: Sequence[int] = (256, 128),
        stride: Optional[int] = None,
        num_cameras: int = 0,
        sie_coe: float = 1.0,
    ):
        super().__init__()
        self.is_vit = isinstance(visual, VisionTransformer)
        if self.is_vit:
            _check_standard_vit(visual)
            self.width = visual.transformer.width
        elif isinstance(visual, ModifiedResNet):
            self.width = visual.attnpool.k_proj.in_features
        else:
            raise TypeError(
                f"Expected an open_clip VisionTransformer or ModifiedResNet, got {type(visual).__name__}"
            )
        set_visual_resolution(visual, image_size, stride)
        self.visual = visual
        self.out_dim = visual.output_dim

        if num_cameras > 0:
            if not self.is_vit:
                raise ValueError("num_cameras > 0 (SIE) needs a ViT visual tower, not ModifiedResNet")
            self.sie_embed = nn.Parameter(torch.zeros(num_cameras, self.width))  # (N_cam, C)
            nn.init.trunc_normal_(self.sie_embed, std=0.02, a=-0.04, b=0.04)  # cut at 2 std
        else:
            self.sie_embed = None
        self.sie_coe = sie_coe

    def forward(
        self, images: torch.Tensor, camids: Optional[torch.Tensor] = None, with_tokens: bool = True,
        sie: bool = True, with_cls_attention: bool = False, with_penultimate_tokens: bool = False,
    ) -> CLIPVisualOutput:
        """images: (B, 3, H, W) normalized; camids: (B,) long, needed with SIE; ``sie=False`` runs
        the tower without its camera embedding (CLIP-ReID's stage-1 image features);
        ``with_cls_attention`` and ``with_penultimate_tokens`` (ViT only) also give the last block's
        CLS attention and the patch tokens before the last block."""
        if self.is_vit:
            return self._forward_vit(images, camids, with_tokens, sie, with_cls_attention, with_penultimate_tokens)
        for name, asked in (("with_cls_attention", with_cls_attention), ("with_penultimate_tokens", with_penultimate_tokens)):
            if asked:
                raise ValueError(f"{name} needs a ViT visual tower, not ModifiedResNet")
        return self._forward_resnet(images, with_tokens)

    def _forward_vit(
        self, images: torch.Tensor, camids: Optional[torch.Tensor], with_tokens: bool, sie: bool = True,
        with_cls_attention: bool = False, with_penultimate_tokens: bool = False,
    ) -> CLIPVisualOutput:
        visual = self.visual
        x = visual.conv1(images)  # (B, C, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, M, C)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1 + M, C)
        if self.sie_embed is not None and sie:
            if camids is None:
                raise ValueError("SIE is on: CLIPVisualBackbone.forward needs camids")
            camera = self.sie_coe * self.sie_embed[camids].to(x.dtype)  # (B, C)
            x = torch.cat([x[:, :1] + camera[:, None], x[:, 1:]], dim=1)
        x = visual.ln_pre(x)

        num_blocks = len(visual.transformer.resblocks)
        x, (x_prev,) = visual.transformer.forward_intermediates(x, indices=[num_blocks - 2])
        if not with_tokens:
            x = x[:, :1]  # ln_post and proj act per token: the CLS token alone gives v
        x = visual.ln_post(x)  # (B, 1 + M, C)
        embedding = x[:, 0] @ visual.proj  # (B, E)
        tokens = x[:, 1:] @ visual.proj if with_tokens else None  # (B, M, E)
        log_cls = log_cls_attention(visual.transformer.resblocks[-1], x_prev) if with_cls_attention else None
        penultimate = visual.ln_post(x_prev[:, 1:]) @ visual.proj if with_penultimate_tokens else None   # (B, M, E)
        return CLIPVisualOutput(embedding, tokens, [x_prev[:, 0], x[:, 0], embedding], log_cls, penultimate)

    def _forward_resnet(self, images: torch.Tensor, with_tokens: bool) -> CLIPVisualOutput:
        visual = self.visual
        x = visual.layer2(visual.layer1(visual.stem(images)))
        x3 = visual.layer3(x)  # (B, C/2, 2h, 2w)
        x4 = visual.layer4(x3)  # (B, C, h, w)
        states = [x3.mean((2, 3)), x4.mean((2, 3))]
        if not with_tokens:
            embedding = visual.attnpool(x4)  # (B, E), CLIP's image embedding
            return CLIPVisualOutput(embedding, None, states + [embedding])
        pooled = _attnpool_every_position(visual.attnpool, x4)  # (1 + h*w, B, E)
        embedding = pooled[0]  # (B, E), the mean-token query: CLIP's image embedding
        tokens = pooled[1:].transpose(0, 1)  # (B, h*w, E)
        return CLIPVisualOutput(embedding, tokens, states + [embedding])


def log_cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log c (B, M): the CLS row of ``block``'s attention on its input ``x`` (B, 1 + M, C), averaged
    over the heads and renormalised over the M patches (its weight on CLS itself left out), in
    float32. Computed in log space, with the key projection folded into the CLS query
    (``few_query_attention_weights``): one query row, as cheap as a few token projections."""
    normed = block.ln_1(x)
    weights = few_query_attention_weights(block.attn, normed[:, :1], normed)[:, 0].float()    # (B, H, 1 + M)
    log_mean = weights.clamp_min(torch.finfo(torch.float32).tiny).log().logsumexp(dim=1)      # log sum_h (B, 1 + M)
    return log_mean[:, 1:].log_softmax(dim=-1)


def _attnpool_every_position(attnpool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d with every position as a query: (B, C, h, w) -> (1 + h*w, B, E).

    Row 0 (the mean-token query) is exactly AttentionPool2d's output; row 1 + i is position i
    pooled with the same q/k/v/c_proj weights, so it lies in the same joint space.
    """
    x = x.flatten(2).permute(2, 0, 1)  # (h*w, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (1 + h*w, B, C)
    x = x + attnpool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=attnpool.num_heads,
        q_proj_weight=attnpool.q_proj.weight,
        k_proj_weight=attnpool.k_proj.weight,
        v_proj_weight=attnpool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=attnpool.c_proj.weight,
        out_proj_bias=attnpool.c_proj.bias,
        use_separate_proj_weight=True,
        training=attnpool.training,
        need_weights=False,
    )
    return out


def _check_standard_vit(visual: VisionTransformer) -> None:
    """The wrapper follows the OpenAI CLIP ViT layout: CLS pooling after ln_post, then proj."""
    standard = (
        visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.final_ln_after_pool
        and visual.proj is not None
        and isinstance(visual.patch_dropout, nn.Identity)
        and len(visual.transformer.resblocks) >= 2
    )
    if not standard:
        raise ValueError(
            "CLIPVisualBackbone supports OpenAI-style CLIP ViTs only (CLS-token pooling, ln_post, "
            "proj, no attentional pooler or patch dropout, at least 2 blocks)"
        )


@BACKBONE_REGISTRY.register()
def build_clip_backbone(cfg, clip_model=None):
    """CLIP visual backbone from cfg.MODEL.CLIP.* and cfg.INPUT.SIZE_TRAIN.

    clip_model: the open_clip CLIP whose visual tower to wrap (the meta-architecture passes
    the model whose text tower it uses); None creates one from MODEL.CLIP.NAME / PRETRAINED.
    """
    clip_cfg = cfg.MODEL.CLIP
    image_size = tuple(cfg.INPUT.SIZE_TRAIN)
    if clip_model is None:      # built on its own (a meta-architecture passing its model checked the config)
        validate_clip_towers(cfg)
        clip_model = clip_model_from_config(cfg)
    return CLIPVisualBackbone(
        clip_model.visual,
        image_size=image_size,
        stride=clip_cfg.STRIDE,
        num_cameras=clip_cfg.NUM_CAMERAS if clip_cfg.SIE_CAMERA else 0,
        sie_coe=clip_cfg.SIE_COE,
    )
