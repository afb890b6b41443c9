"""The PromptSG meta-architecture (Fig. 3), registered in FastReID's META_ARCH_REGISTRY.

    v, patches = V(x)                          CLIP visual encoder      (clip_backbone.py)
    s* = f_theta(v)                            inversion network        (inversion.py)
    l_p = T("A photo of a s* person.")         frozen text encoder      (prompt.py)
    f = MIM(query=l_p, key/value=patches)      interaction module       (interaction.py)
    L = L_Triplet + L_ID + lambda * L_SupCon   losses (Eq. 10)          (here, supcon.py)

At test time l_p is the cached embedding of "A photo of a person." (simplified prompt) or the
per-image composed prompt (MODEL.PROMPTSG.INFERENCE_PROMPT). Text-aware search
(tools/extract_features.py --text) reads two more things: ``features_with_words`` (the MIM query
"A photo of a s* person <words>.") and ``image_embeddings`` (v alone, compared with a text).

MODEL.PROMPTSG.COMPILE compiles the visual encoder, the text encoder, the head and the loss terms
with torch.compile (parameter names, checkpoints and results unchanged; tests/test_fast_paths.py).
"""
import logging
from typing import NamedTuple, Optional

import torch
from fastreid.config import configurable
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
from torch import nn

from .clip_weights import clip_model_from_config
from ..config import validate_promptsg_config
from .heads import uses_text_tower
from ..utils.deferred_log import DeferredScalars
from .diagnostics import alignment_diagnostics, mean_pairwise_cosine
from ..utils.distributed import gather_batch, world_size
from .losses import cross_entropy_loss, top1_accuracy, triplet_loss
from .prompt import build_prompt_composer
from .supcon import symmetric_supcon_loss


logger = logging.getLogger(__name__)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that add CUDA graphs


@META_ARCH_REGISTRY.register()
class PromptSG(nn.Module):
    """Prompt-driven semantic guidance for person re-identification (Yang et al., CVPR 2024)."""

    @configurable
    def __init__(self, *, backbone, text, heads, pixel_mean, pixel_std, compose_train,
                 inference_prompt, mim_query, loss_kwargs, compile_mode="", simplified_query_share=0.0):
        super().__init__()
        self.backbone = backbone
        self.text = text        # frozen PromptComposer, or None for the visual-only baseline
        self.heads = heads
        self.compose_train = compose_train
        self.inference_prompt = inference_prompt
        self.mim_query = mim_query
        self.simplified_query_share = simplified_query_share
        self.loss_kwargs = loss_kwargs
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)
        self.train_log = DeferredScalars()   # accuracy and alignment diagnostics, no host sync
        self.compile_mode = compile_mode
        self._loss_terms = loss_terms
        if compile_mode in CUDA_GRAPH_MODES:
            logger.warning(
                "MODEL.PROMPTSG.COMPILE %s adds CUDA graphs: measured on training steps "
                "(tools/perf/benchmark.py); its run through FastReID's trainer and evaluator awaits a GPU "
                "check (tools/perf/gpu_compile_check.sh). MODEL.PROMPTSG.COMPILE default has no CUDA graphs.",
                compile_mode)
        if compile_mode:
            # nn.Module.compile keeps parameter names, so checkpoints are those of the eager model.
            for module in (self.backbone, self.text, self.heads):
                if module is not None:
                    module.compile(mode=compile_mode)
            self._loss_terms = torch.compile(loss_terms, mode=compile_mode)

    @classmethod
    def from_config(cls, cfg):
        validate_promptsg_config(cfg)
        p, losses = cfg.MODEL.PROMPTSG, cfg.MODEL.LOSSES
        clip_model = clip_model_from_config(cfg)
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, clip_model=clip_model)
        text = (build_prompt_composer(clip_model, cfg.MODEL.CLIP.NAME, p.PROMPT, p.SIMPLE_PROMPT)
                if uses_text_tower(cfg) else None)
        heads = REID_HEADS_REGISTRY.get(cfg.MODEL.HEADS.NAME)(
            cfg, embed_dim=backbone.out_dim, token_dim=text.width if text is not None else 0)
        if heads.inversion is not None and p.PSEUDO_TOKEN_INIT == "token":
            heads.inversion.init_like_token_embeddings(text.token_embedding.weight)
        return {
            "backbone": backbone,
            "text": text,
            "heads": heads,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "compose_train": p.COMPOSE_TRAIN,
            "inference_prompt": p.INFERENCE_PROMPT,
            "mim_query": p.MIM.QUERY,
            "simplified_query_share": p.SIMPLIFIED_QUERY_SHARE,
            "compile_mode": p.COMPILE,
            "loss_kwargs": {
                "loss_names": losses.NAME,
                "ce": {"eps": losses.CE.EPSILON, "alpha": losses.CE.ALPHA, "scale": losses.CE.SCALE},
                "tri": {"margin": losses.TRI.MARGIN, "norm_feat": losses.TRI.NORM_FEAT,
                        "hard_mining": losses.TRI.HARD_MINING, "scale": losses.TRI.SCALE},
                "tri_visual_states": p.TRIPLET_ON_VISUAL_STATES,
                "supcon": {"scale": losses.SUPCON.SCALE, "temperature": supcon_temperature(cfg, clip_model),
                           "i2t": losses.SUPCON.I2T, "t2i": losses.SUPCON.T2I,
                           "positives": losses.SUPCON.POSITIVES, "map_scale": losses.SUPCON.MAP_SCALE},
            },
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        if self.compile_mode in CUDA_GRAPH_MODES:
            # One forward pass is one CUDA-graph step: the graphs it runs (encoders, head,
            # losses) may read each other's outputs, and only the next forward reuses their
            # memory. Without this, PyTorch starts a new step at every compiled call in
            # inference and the head would read overwritten encoder outputs.
            torch.compiler.cudagraph_mark_step_begin()
        images = self.preprocess_image(batched_inputs)
        camids = batched_inputs.get("camids") if isinstance(batched_inputs, dict) else None
        visual = self.encode_visual(images, camids)
        composed = self.compose_train if self.training else self.inference_prompt == "composed"
        prompt = self.prompt_features(visual, composed)

        if not self.training:
            feat = self.heads(visual, prompt.query, prompt.out_index)
            # Under CUDA graphs the next call reuses this output's memory (FastReID's flip test
            # calls the model twice before averaging): hand out a copy.
            return feat.clone() if self.compile_mode in CUDA_GRAPH_MODES else feat
        targets = batched_inputs["targets"]
        query = prompt.query
        if self.simplified_query_share > 0 and prompt.pseudo_tokens is not None:
            query = self.mix_simplified_query(query)
        outputs = self.heads(visual, query, prompt.out_index, targets)
        return self.losses(outputs, visual, prompt, targets)

    @torch.no_grad()
    def image_embeddings(self, batched_inputs):
        """CLIP's global image embedding v (B, E) of each image: the space L_SupCon ties to the prompts."""
        images = self.preprocess_image(batched_inputs)
        camids = batched_inputs.get("camids") if isinstance(batched_inputs, dict) else None
        return self.backbone(images, camids, with_tokens=False).embedding

    @torch.no_grad()
    def features_with_words(self, batched_inputs, words):
        """Retrieval features (B, D) whose MIM query is "A photo of a s* person <words[i]>.", s* each
        image's own pseudo token; ``words[i]`` empty gives the composed prompt's feature.

        With the pooled prompt as the MIM query the batch runs at once; with every prompt token as
        a query (MIM.QUERY tokens), images that share words are run together.
        """
        if self.heads.inversion is None or self.heads.mim is None:
            raise ValueError("features_with_words needs the inversion network f_theta and the MIM")
        images = self.preprocess_image(batched_inputs)
        camids = batched_inputs.get("camids") if isinstance(batched_inputs, dict) else None
        visual = self.encode_visual(images, camids)
        if self.mim_query != "tokens":
            prompt = self.prompt_features(visual, composed=True, words=words)
            return self.heads(visual, prompt.query, prompt.out_index)
        feats = None
        for group in dict.fromkeys(words):
            rows = torch.tensor([i for i, w in enumerate(words) if w == group], device=images.device)
            part = visual.rows(rows)
            prompt = self.prompt_features(part, composed=True, words=group)
            feat = self.heads(part, prompt.query, prompt.out_index)
            feats = feat.new_empty(len(words), feat.shape[1]) if feats is None else feats
            feats[rows] = feat
        return feats

    def mix_simplified_query(self, query):
        """MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE (beyond the paper): each image's MIM query (B, 1, E)
        is the simplified prompt's embedding with this probability, else its composed prompt's."""
        simple = self.text.simple(len(query), query.device)[:, None, :].to(query.dtype)   # (B, 1, E)
        use_simple = torch.rand(len(query), 1, 1, device=query.device) < self.simplified_query_share
        return torch.where(use_simple, simple, query)

    def prompt_features(self, visual, composed, words=""):
        """s* (B, D) if composed, the prompt embedding l_p (B, E) and the MIM query (B, Q, E); ``words``
        (one string, or one per image) are added to the composed prompt (text-aware search)."""
        if self.text is None:
            return PromptFeatures()
        need_tokens = self.mim_query == "tokens" and self.heads.mim is not None
        batch = visual.embedding.shape[0]   # not len(): a symbolic size under torch.export (ONNX)
        pseudo_tokens = None
        if composed:
            pseudo_tokens = self.heads.inversion(visual.embedding)            # s* = f_theta(v)
            out = self.text.compose(pseudo_tokens, return_tokens=need_tokens, words=words)
        elif self.heads.mim is not None:
            out = self.text.simple(batch, visual.embedding.device, return_tokens=need_tokens)
        else:
            return PromptFeatures()                                            # text is not used
        if need_tokens:
            text, tokens = out
            return PromptFeatures(pseudo_tokens, text, tokens, tokens.shape[1] - 1)  # EOT: last token
        return PromptFeatures(pseudo_tokens, out, out[:, None, :], 0)

    def encode_visual(self, images, camids=None):
        """The visual encoder's outputs (CLIPVisualOutput) for normalised ``images``, with what the
        head reads: the patch tokens if it has a MIM, the last block's CLS attention if its map
        takes it as a prior (MIM.MAP_PRIOR), the penultimate patch tokens if its map takes them as
        keys (MIM.MAP_KEYS)."""
        return self.backbone(images, camids, with_tokens=self.heads.mim is not None,
                             with_cls_attention=self.heads.needs_cls_attention,
                             with_penultimate_tokens=self.heads.needs_penultimate_tokens)

    def preprocess_image(self, batched_inputs):
        images = batched_inputs["images"] if isinstance(batched_inputs, dict) else batched_inputs
        return (images.to(self.device) - self.pixel_mean) / self.pixel_std

    def losses(self, outputs, visual, prompt, targets):
        """L = L_Triplet + L_ID + lambda * L_SupCon (Eq. 10), by MODEL.LOSSES.NAME.

        Also logs the training accuracy, the collapse of v and, where s* is composed, the other
        alignment diagnostics.
        """
        log = {"cls_accuracy": top1_accuracy(outputs["pred_class_logits"].detach(), targets)}
        if prompt.pseudo_tokens is not None:
            log.update(alignment_diagnostics(visual.embedding, prompt.text, targets, prompt.pseudo_tokens,
                                             self.text.token_norm()))
        else:
            log["collapse_v_cos"] = mean_pairwise_cosine(visual.embedding.detach())
        self.train_log.put(log)
        text, batch_targets = prompt.text, targets
        if world_size() > 1:
            outputs, visual, text, batch_targets = self.global_batch(outputs, visual, text, targets)
        return self._loss_terms(self.loss_kwargs, outputs, visual, text, targets, batch_targets,
                                self.heads.mim is not None)

    def global_batch(self, outputs, visual, text, targets):
        """With several processes, what the batch-level terms (triplet, L_SupCon) read, gathered over
        the global batch (promptsg.utils.distributed); the ID loss keeps each process's share, which DDP's
        gradient average makes global."""
        names, kw = self.loss_kwargs["loss_names"], self.loss_kwargs
        if "TripletLoss" in names:
            outputs = dict(outputs, features=gather_batch(outputs["features"]))
            if kw["tri_visual_states"]:
                visual = visual._replace(states=[gather_batch(s) for s in visual.states])
        if "SupConLoss" in names:
            visual = visual._replace(embedding=gather_batch(visual.embedding))
            if "map_pool" in outputs:
                outputs = dict(outputs, map_pool=gather_batch(outputs["map_pool"]))
            text = gather_batch(text)
        return outputs, visual, text, gather_batch(targets)


def supcon_temperature(cfg, clip_model):
    """tau of L_SupCon: MODEL.LOSSES.SUPCON.TEMPERATURE, or with 0 CLIP's own, 1 / exp(logit_scale)."""
    if cfg.MODEL.LOSSES.SUPCON.TEMPERATURE > 0:
        return float(cfg.MODEL.LOSSES.SUPCON.TEMPERATURE)
    tau = 1.0 / float(clip_model.logit_scale.detach().exp())
    if "SupConLoss" in cfg.MODEL.LOSSES.NAME:
        logger.info("L_SupCon temperature: CLIP's own, tau = 1 / exp(logit_scale) = %.4f", tau)
    return tau


class PromptFeatures(NamedTuple):
    """The text side of one forward pass (all None for a model that uses no text).

    pseudo_tokens: s* (B, D) when the prompt is composed; text: l_p (B, E); query: the MIM query
    (B, Q, E); out_index: the query position the MIM output is read at.
    """
    pseudo_tokens: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    query: Optional[torch.Tensor] = None
    out_index: int = 0


def loss_terms(kw, outputs, visual, text, targets, batch_targets, has_mim):
    """The loss dict of PromptSG.losses; a plain function of tensors, so torch.compile can fuse it.

    targets: the identities of this process's share (ID loss); batch_targets: those of the batch
    the triplet loss and L_SupCon see (the global batch with several processes).
    """
    names = kw["loss_names"]
    loss_dict = {}
    if "CrossEntropyLoss" in names:
        ce = kw["ce"]
        loss_dict["loss_cls"] = cross_entropy_loss(outputs["cls_outputs"], targets, ce["eps"], ce["alpha"]) * ce["scale"]
    if "TripletLoss" in names:
        tri = kw["tri"]

        def triplet(feat):
            return triplet_loss(feat, batch_targets, tri["margin"], tri["norm_feat"], tri["hard_mining"]) * tri["scale"]

        loss_dict["loss_triplet"] = triplet(outputs["features"])
        if kw["tri_visual_states"]:
            # x_{L-1}, x_L and proj(x_L); the last is the final feature itself without a MIM.
            states = visual.states if has_mim else visual.states[:-1]
            loss_dict["loss_triplet_visual"] = sum(triplet(s) for s in states)
    if "SupConLoss" in names:
        sc = kw["supcon"]
        loss_dict["loss_supcon"] = sc["scale"] * symmetric_supcon_loss(
            visual.embedding, text, batch_targets, sc["temperature"], sc["i2t"], sc["t2i"], sc["positives"])
        if "map_pool" in outputs:
            # Beyond the paper: the prompt's map pool of the patches tied to the prompt, likewise.
            loss_dict["loss_supcon_map"] = sc["map_scale"] * symmetric_supcon_loss(
                outputs["map_pool"], text.detach(), batch_targets, sc["temperature"], sc["i2t"], sc["t2i"], sc["positives"])
    return loss_dict
