"""PromptSG's trainable head: f_theta, the MIM and the BNNeck ID classifier.

Everything here is new (randomly initialised) and sits under ``model.heads``, so FastReID's
solver gives it ``SOLVER.HEADS_LR_FACTOR`` x the visual encoder's learning rate (5e-5 vs 5e-6).
"""
import torch
from fastreid.config import configurable
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.layers.weight_init import weights_init_classifier, weights_init_kaiming
from torch import nn

from ..utils.distributed import GlobalBatchNorm1d
from .inversion import InversionNet
from .interaction import MAP_FUSIONS, MultimodalInteraction


@REID_HEADS_REGISTRY.register()
class PromptSGHead(nn.Module):
    """f_theta (optional), MIM (optional), BNNeck and a linear ID classifier.

    Without a MIM the final feature is the global visual embedding v (the CLIP baseline and
    Table 3 row d); with it, the MIM output (or MIM output ++ v, ``feature="concat"``).
    """

    @configurable
    def __init__(self, *, embed_dim, token_dim, num_classes, use_inversion, inversion_hidden,
                 mim_cross_layers, mim_self_layers, mim_heads, feature, neck_feat,
                 mim_fusion="learned_map", mim_map_contrast=2.0, map_pool=False, mim_map_prior=False,
                 mim_penultimate_keys=False, mim_prior_power=1.0):
        super().__init__()
        self.inversion = InversionNet(embed_dim, token_dim, inversion_hidden) if use_inversion else None
        self.mim = (MultimodalInteraction(embed_dim, mim_heads, mim_cross_layers, mim_self_layers, mim_fusion,
                                          mim_map_contrast, mim_map_prior, mim_penultimate_keys,
                                          mim_prior_power)
                    if mim_cross_layers > 0 else None)
        self.feature = feature
        self.map_pool = map_pool   # training also returns the MIM map's pool of the patches
        self.neck_feat = neck_feat
        feat_dim = embed_dim * (2 if self.mim is not None and feature == "concat" else 1)
        self.bottleneck = GlobalBatchNorm1d(feat_dim)  # BNNeck, bias frozen (Luo et al.)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        self.bottleneck.apply(weights_init_kaiming)
        self.classifier.apply(weights_init_classifier)

    @classmethod
    def from_config(cls, cfg, *, embed_dim, token_dim):
        p = cfg.MODEL.PROMPTSG
        map_fusion = p.MIM.FUSION in MAP_FUSIONS
        return {
            "embed_dim": embed_dim,
            "token_dim": token_dim,
            "num_classes": cfg.MODEL.HEADS.NUM_CLASSES,
            "use_inversion": uses_inversion(cfg),
            "inversion_hidden": p.INVERSION_HIDDEN,
            "mim_cross_layers": p.MIM.CROSS_LAYERS,
            "mim_self_layers": p.MIM.SELF_LAYERS,
            "mim_heads": p.MIM.HEADS,
            "mim_fusion": p.MIM.FUSION,
            "mim_map_contrast": p.MIM.MAP_CONTRAST,
            # The map's options, read by the map fusions only ("attention" has no map).
            "mim_map_prior": map_fusion and bool(p.MIM.MAP_PRIOR),        # "" or "cls_attention", MAP_PRIORS
            "mim_penultimate_keys": map_fusion and bool(p.MIM.MAP_KEYS),  # "" or "penultimate", MAP_KEYS
            "mim_prior_power": p.MIM.MAP_PRIOR_POWER if map_fusion and p.MIM.MAP_PRIOR else 1.0,
            "map_pool": cfg.MODEL.LOSSES.SUPCON.MAP_SCALE > 0,
            "feature": p.FEATURE,
            "neck_feat": cfg.MODEL.HEADS.NECK_FEAT,
        }

    @property
    def needs_cls_attention(self):
        """Whether the MIM's map takes the encoder's last-block CLS attention as its prior (MIM.MAP_PRIOR)."""
        return self.mim is not None and self.mim.map_prior

    @property
    def needs_penultimate_tokens(self):
        """Whether the MIM's map takes the patch tokens before the encoder's last block as its keys (MIM.MAP_KEYS)."""
        return self.mim is not None and self.mim.penultimate_keys

    def forward(self, visual, query=None, out_index=0, targets=None):
        """visual: CLIPVisualOutput; query: (B, Q, E) text queries of the MIM.

        Training: FastReID's head dict (cls_outputs, pred_class_logits, features).
        Inference: the (B, D) retrieval feature.
        """
        feat, extra = visual.embedding, {}
        if self.mim is not None:
            with_pool = self.map_pool and self.training
            fused = self.mim(query.to(visual.tokens.dtype), visual.tokens, out_index, visual.embedding,
                             with_map_pool=with_pool, log_prior=visual.log_cls_attention,
                             map_keys=visual.penultimate_tokens)
            if with_pool:
                fused, extra["map_pool"] = fused
            feat = torch.cat([fused, visual.embedding], dim=1) if self.feature == "concat" else fused
        neck = self.bottleneck(feat)
        if not self.training:
            return feat if self.neck_feat == "before" else neck
        logits = self.classifier(neck)
        return {"cls_outputs": logits, "pred_class_logits": logits, "features": feat, **extra}


def uses_inversion(cfg):
    """f_theta exists when s* is composed in training or at test time."""
    p = cfg.MODEL.PROMPTSG
    return p.COMPOSE_TRAIN or p.INFERENCE_PROMPT == "composed"


def uses_text_tower(cfg):
    """PromptSG builds (and checkpoints) CLIP's frozen text tower when it composes s* or has a MIM."""
    return uses_inversion(cfg) or cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS > 0
