"""CLIP-ReID (Li, Sun and Li, AAAI 2023), the two-stage CLIP method PromptSG is compared with, as
a meta-architecture of this project: the same CLIP towers, text encoder, SupCon, losses and
FastReID trainer as PromptSG, so the two run side by side on one data pipeline and one evaluator.

    Stage 1: identity prompts (``engine/prompt_stage.py`` runs it before stage 2's first step)
        t_c = T("A photo of a [c]1 [c]2 [c]3 [c]4 person.")   four learnable context tokens per
                                                               training identity c (IdentityPrompts)
        both CLIP encoders frozen, each training image's v computed once;
        L = L_i2t + L_t2i                                      SupCon on the raw features, tau 1,
                                                               averaged over the positives (stage1_loss)
    Stage 2: the visual encoder fine-tuned (FastReID's trainer; CLIPReID.losses)
        x11, x12, v = V(x)                                     CLS after block L-1, ln_post(CLS), projection
        L = w_id  (CE(W1 BN(x12)) + CE(W2 BN(v)))              label-smoothed ID loss, two BNNecks
          + w_tri (Tri(x11) + Tri(x12) + Tri(v))               triplet
          + w_i2t CE(v T^T)                                    image-to-text cross-entropy against the
                                                               frozen text features T (C, E) of every
                                                               training identity, from stage 1
    Test: [x12; v], before the BNNecks (1280-d for ViT-B/16); the text tower is not run.

The published recipe (Syliz517/CLIP-ReID, configs/person/vit_clipreid.yml and cnn_clipreid.yml)
is in projects/PromptSG/configs/*/clipreid_*.yml, each value with where it comes from.
"""
import math

import torch
from fastreid.config import configurable
from fastreid.layers.weight_init import weights_init_classifier, weights_init_kaiming
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
from torch import nn

from ..config import validate_clipreid_config
from ..utils.deferred_log import DeferredScalars
from ..utils.distributed import GlobalBatchNorm1d, gather_batch, world_size
from .clip_weights import clip_model_from_config
from .losses import cross_entropy_loss, top1_accuracy, triplet_loss
from .meta_arch import PromptSG
from .prompt import build_prompt_composer
from .supcon import symmetric_supcon_loss


class IdentityPrompts(nn.Module):
    """The learnable context tokens of stage 1: one (n, D) block per training identity, put in
    place of the n consecutive placeholder words of ``prompt`` ("A photo of a X X X X person.").

    Args:
        text: the frozen ``PromptComposer`` whose tokenizer and token embeddings frame the prompt.
        prompt: the prompt, with n >= 1 consecutive placeholder words.
        num_identities: C, the training identities.
    """

    def __init__(self, text, prompt, num_identities, placeholder="X"):
        super().__init__()
        ids = text.tokenize(prompt)
        word = text.tokenizer([placeholder])[0][1]
        positions = (ids == word).nonzero().flatten().tolist()
        if not positions or positions != list(range(positions[0], positions[0] + len(positions))):
            raise ValueError(f"prompt {prompt!r} must hold its placeholder words {placeholder!r} "
                             f"once, next to each other (\"A photo of a X X X X person.\")")
        self.start, self.length = positions[0], len(positions)
        self.register_buffer("ids", ids.clone(), persistent=False)
        self.eot = len(ids) - 1
        # CLIP-ReID's initialisation: normal, std 0.02. Trained in stage 1 only (its own optimizer).
        self.context = nn.Parameter(torch.empty(num_identities, self.length, text.width).normal_(std=0.02),
                                    requires_grad=False)

    @property
    def num_identities(self):
        return self.context.shape[0]

    def token_embeddings(self, token_embedding, labels):
        """(B, n_tokens, D) token embeddings of the prompts of identities ``labels`` (B,)."""
        base = token_embedding(self.ids)[None].to(self.context.dtype).expand(len(labels), -1, -1)
        end = self.start + self.length
        return torch.cat([base[:, :self.start], self.context[labels], base[:, end:]], dim=1)


@REID_HEADS_REGISTRY.register()
class CLIPReIDHead(nn.Module):
    """CLIP-ReID's two BNNecks (bias frozen) and ID classifiers, on x12 (width C) and on v (width E).

    Training: ``{"cls_outputs": (logits on x12, logits on v)}``. Test: [x12; v] (NECK_FEAT before)
    or the two BNNecks' outputs (after).
    """

    @configurable
    def __init__(self, *, width, embed_dim, num_classes, neck_feat):
        super().__init__()
        self.neck_feat = neck_feat
        self.bottleneck = GlobalBatchNorm1d(width)
        self.bottleneck_proj = GlobalBatchNorm1d(embed_dim)
        self.classifier = nn.Linear(width, num_classes, bias=False)
        self.classifier_proj = nn.Linear(embed_dim, num_classes, bias=False)
        for bn in (self.bottleneck, self.bottleneck_proj):
            bn.bias.requires_grad_(False)
            bn.apply(weights_init_kaiming)
        for fc in (self.classifier, self.classifier_proj):
            fc.apply(weights_init_classifier)

    @classmethod
    def from_config(cls, cfg, *, width, embed_dim):
        return {"width": width, "embed_dim": embed_dim, "num_classes": cfg.MODEL.HEADS.NUM_CLASSES,
                "neck_feat": cfg.MODEL.HEADS.NECK_FEAT}

    def forward(self, visual):
        x12, v = visual.states[1], visual.embedding
        neck, neck_proj = self.bottleneck(x12), self.bottleneck_proj(v)
        if not self.training:
            return torch.cat([x12, v], dim=1) if self.neck_feat == "before" else torch.cat([neck, neck_proj], dim=1)
        return {"cls_outputs": (self.classifier(neck), self.classifier_proj(neck_proj))}


@META_ARCH_REGISTRY.register()
class CLIPReID(nn.Module):
    """CLIP-ReID's model; the module docstring gives its two stages."""

    @configurable
    def __init__(self, *, backbone, text, prompts, heads, pixel_mean, pixel_std, loss_kwargs, prompt="",
                 clip_name=""):
        super().__init__()
        self.prompts_text, self.clip_name = prompt, clip_name   # recorded in the stage-1 file
        self.backbone = backbone
        self.text = text            # frozen PromptComposer: CLIP's text tower
        self.prompts = prompts      # stage 1's context tokens
        self.heads = heads
        self.loss_kwargs = loss_kwargs
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)
        # T: the frozen text features of every training identity (stage 1's result, read by stage 2's
        # L_i2t); saved in checkpoints, so a resumed stage 2 needs no stage 1.
        self.register_buffer("identity_text", torch.zeros(prompts.num_identities, text.embed_dim))
        self.train_log = DeferredScalars()

    @classmethod
    def from_config(cls, cfg):
        validate_clipreid_config(cfg)
        clip = cfg.MODEL.CLIP
        clip_model = clip_model_from_config(cfg)
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, clip_model=clip_model)
        text = build_prompt_composer(clip_model, clip.NAME, cfg.MODEL.PROMPTSG.PROMPT, cfg.MODEL.PROMPTSG.SIMPLE_PROMPT)
        prompts = IdentityPrompts(text, cfg.MODEL.CLIPREID.PROMPT, cfg.MODEL.HEADS.NUM_CLASSES)
        heads = REID_HEADS_REGISTRY.get(cfg.MODEL.HEADS.NAME)(cfg, width=backbone.width, embed_dim=backbone.out_dim)
        losses = cfg.MODEL.LOSSES
        return {
            "backbone": backbone, "text": text, "prompts": prompts, "heads": heads,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "prompt": cfg.MODEL.CLIPREID.PROMPT, "clip_name": clip.NAME,
            "loss_kwargs": {"eps": losses.CE.EPSILON, "id": losses.CE.SCALE, "margin": losses.TRI.MARGIN,
                            "norm_feat": losses.TRI.NORM_FEAT, "hard_mining": losses.TRI.HARD_MINING,
                            "triplet": losses.TRI.SCALE, "i2t": losses.I2T.SCALE},
        }

    @property
    def device(self):
        return self.pixel_mean.device

    preprocess_image = PromptSG.preprocess_image      # the same normalisation by pixel_mean / pixel_std

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        camids = batched_inputs.get("camids") if isinstance(batched_inputs, dict) else None
        visual = self.backbone(images, camids, with_tokens=False)
        if not self.training:
            return self.heads(visual)
        targets = batched_inputs["targets"]
        return self.losses(self.heads(visual), visual, targets)

    def losses(self, outputs, visual, targets):
        """Stage 2's loss dict (the module docstring's L), by term."""
        kw = self.loss_kwargs
        logits, logits_proj = outputs["cls_outputs"]
        self.train_log.put({"cls_accuracy": top1_accuracy(logits_proj.detach(), targets)})
        loss_cls = cross_entropy_loss(logits, targets, kw["eps"]) + cross_entropy_loss(logits_proj, targets, kw["eps"])
        i2t_logits = visual.embedding.float() @ self.identity_text.t()                    # (B, C)
        loss_i2t = cross_entropy_loss(i2t_logits, targets, kw["eps"])
        states, batch_targets = visual.states, targets
        if world_size() > 1:        # the triplet's batch is the global batch, as PromptSG's
            states, batch_targets = [gather_batch(s) for s in states], gather_batch(targets)
        loss_triplet = sum(triplet_loss(s, batch_targets, kw["margin"], kw["norm_feat"], kw["hard_mining"])
                           for s in states)
        return {"loss_cls": loss_cls * kw["id"], "loss_triplet": loss_triplet * kw["triplet"],
                "loss_i2t": loss_i2t * kw["i2t"]}

    # ---- Stage 1 ----
    @torch.no_grad()
    def image_features(self, batched_inputs):
        """Each image's v (B, E) from the frozen visual encoder, without SIE's camera embedding (not
        trained yet): what stage 1 ties the identity prompts to."""
        images = self.preprocess_image(batched_inputs)
        return self.backbone(images, None, with_tokens=False, sie=False).embedding.float()

    def identity_text_features(self, labels):
        """t_c (B, E) of the identities ``labels`` (B,): their prompts through the frozen text tower
        (differentiable in the context tokens)."""
        tokens = self.prompts.token_embeddings(self.text.token_embedding, labels)
        return self.text(tokens, self.prompts.eot)

    @torch.no_grad()
    def refresh_identity_text(self, chunk=256):
        """T = the text features of every training identity, from the context tokens as they are."""
        for start in range(0, self.prompts.num_identities, chunk):
            labels = torch.arange(start, min(start + chunk, self.prompts.num_identities), device=self.device)
            self.identity_text[labels] = self.identity_text_features(labels).float()


def stage1_loss(image_features, text_features, labels, temperature=1.0):
    """Stage 1's L_i2t + L_t2i: SupCon on the raw features (dot products / tau), every image of an
    identity a positive (the anchor's own pair included), averaged over the positives."""
    return symmetric_supcon_loss(image_features, text_features, labels, temperature, positives="mean",
                                 normalize=False)


def stage1_learning_rate(epoch, base_lr, warmup_lr, warmup_epochs, min_lr, epochs):
    """Stage 1's learning rate in ``epoch``, counted from 1 as CLIP-ReID's loop passes it to timm's
    cosine scheduler (``scheduler.step(epoch)`` for epoch 1 .. ``epochs``): linear from ``warmup_lr``
    (epoch 0, never used) over ``warmup_epochs``, then a cosine from ``base_lr`` (at epoch 0 of the
    cosine's span, ``epochs`` long) down to ``min_lr`` at epoch ``epochs``."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
