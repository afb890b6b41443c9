"""Multimodal interaction module, MIM (Sec. 4.2, Eq. 7, Table 5).

Text-as-query cross-attention over the patch embeddings, then self-attention transformer blocks
over [x; patches], read at x's position. The blocks are open_clip's ``ResidualAttentionBlock``
(pre-norm attention + MLP).

Design choices the paper leaves open (the project README, "Design choices"):
  * how the cross-attention's result reaches the feature (``fusion``, MODEL.PROMPTSG.MIM.FUSION).
    By default ("learned_map") the prompt's attention over the patches is a map a; x is the global
    visual embedding v, and log(M a) is added to v's attention logits over the patch keys in every
    block, so the prompt chooses which patch tokens v's feature is made of. A bias on the logits
    survives the blocks' LayerNorm, which removes any scale put on the tokens themselves (the
    earlier "reweight" wiring, docs/EXPERIMENTS.md "Language guidance at test"). The map can be
    tied to the prompt in training (MODEL.LOSSES.SUPCON.MAP_SCALE, ``with_map_pool``): the prompt
    then keeps acting at test. The map may also take the visual encoder's last-block CLS attention
    as a prior (MODEL.PROMPTSG.MIM.MAP_PRIOR, ``map_prior``), raised to a power (MAP_PRIOR_POWER,
    ``prior_power``): the prompt then re-weights where the encoder looks; and its keys may be the
    patch tokens before the encoder's last block (MODEL.PROMPTSG.MIM.MAP_KEYS, ``penultimate_keys``).
    Base-PromptSG.yml sets all three (keys penultimate, prior cls_attention, power 2): the default.
    "attention" is Eq. 7 as written (x = A(q, P));
  * width = CLIP's joint embedding width E (512 for ViT-B/16), the space both the text
    embedding l_p and the projected patch tokens live in;
  * query = the pooled EOT text embedding (one token), or every prompt token (``query="tokens"``,
    read at the EOT position);
  * the self-attention blocks attend over x and the patches: over a single token alone,
    self-attention would be an identity mixing.

Two exact fast paths (tests/test_promptsg_model.py, tests/test_fast_paths.py): only the read row
of the last block is computed (``query_row_forward``), and attention with a few queries never
projects the keys and values (``few_query_attention``, ``PatchWeighting``). ``cross_attention_weights``
gives the prompt's weights over the patches that the forward uses (the attention maps of Fig. 1
and 5, tools/attention_maps.py) without touching that path.
"""
import math

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


FUSIONS = ("learned_map", "attention")
# The fusions in which the prompt acts only through its map over the patches, a bias on v's
# attention logits in the self-attention blocks (no value path from the prompt to the feature).
MAP_FUSIONS = ("learned_map",)
# Every fusion a released checkpoint may hold, at the index saved in its ``fusion_index`` buffer
# (append only). Those not in FUSIONS were removed; their checkpoints are refused by name
# (engine/checkpoint.check_mim_fusion) and their results stay in docs/EXPERIMENTS.md.
FUSION_HISTORY = ("query_residual", "attention", "visual_residual", "reweight", "learned_map", "clip_map")
REMOVED_FUSIONS = tuple(f for f in FUSION_HISTORY if f not in FUSIONS)
# MODEL.PROMPTSG.MIM.MAP_PRIOR's values, at the index saved in a checkpoint's ``map_prior_index``.
MAP_PRIORS = ("", "cls_attention")
# MODEL.PROMPTSG.MIM.MAP_KEYS's values, at the index saved in a checkpoint's ``map_keys_index``: the
# map's keys are the patch tokens ("") or the patch tokens before the encoder's last block.
MAP_KEYS = ("", "penultimate")


class MultimodalInteraction(nn.Module):
    """Cross-attention (text queries, patch keys/values) followed by self-attention blocks.

    Args:
        width: token width E.
        heads: attention heads.
        cross_layers: number of cross-attention blocks (>= 1; exactly 1 for the map fusions).
        self_layers: number of self-attention blocks after them (>= 1 for the map fusions).
        fusion: how the cross-attention's result reaches the feature (MODEL.PROMPTSG.MIM.FUSION):
              "learned_map": the prompt's map a over the M patches is the head mean of
                  softmax(QK^T / sqrt(d)) logits, standardised over the patches and scaled by
                  ``map_contrast`` before the softmax (a map that training can move but not
                  flatten); [v; patches] runs through the blocks with log(M a_m) added to v's
                  attention logit over patch m in every block, and the feature is read at v.
              "attention": x = A(q, P) (Eq. 7 as written): the feature depends on the query only
                  through the attention weights; [x; patches] through the blocks, read at x.
        map_contrast: the scale of the standardised logits (MODEL.PROMPTSG.MIM.MAP_CONTRAST).
        map_prior: (map fusions) the map is softmax(map_contrast * z + prior_power * log c), c the
            visual encoder's last-block CLS attention over the patches (MODEL.PROMPTSG.MIM.MAP_PRIOR
            "cls_attention"): the prompt re-weights where the encoder already looks. ``forward``
            then needs ``log_prior`` = log c.
        prior_power: the power the prior is raised to, c^prior_power (MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER;
            1 is c itself, above 1 sharpens it onto where the encoder looks most).
        penultimate_keys: (map fusions) the map's keys are not the patch tokens the blocks read but
            the patch tokens before the encoder's last block (MODEL.PROMPTSG.MIM.MAP_KEYS
            "penultimate"), given to ``forward`` as ``map_keys``.
    """

    def __init__(self, width, heads=8, cross_layers=1, self_layers=2, fusion="learned_map", map_contrast=2.0,
                 map_prior=False, penultimate_keys=False, prior_power=1.0):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"MultimodalInteraction fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if cross_layers < 1:
            raise ValueError("MultimodalInteraction needs at least one cross-attention layer")
        if fusion in MAP_FUSIONS and (cross_layers != 1 or self_layers < 1):
            raise ValueError(f"fusion {fusion!r} needs exactly one cross-attention layer and self-attention "
                             "blocks to read v from")
        if (map_prior or penultimate_keys) and fusion not in MAP_FUSIONS:
            raise ValueError(f"fusion {fusion!r} has no map over the patches to give a prior or keys")
        if float(prior_power) != 1.0 and not map_prior:
            raise ValueError(f"prior_power {prior_power} needs map_prior: there is no prior to raise to it")
        self.fusion = fusion
        self.map_contrast = float(map_contrast)
        self.map_prior = bool(map_prior)
        self.prior_power = float(prior_power)
        self.penultimate_keys = bool(penultimate_keys)
        # Saved with the weights, so that a checkpoint is never evaluated under another wiring
        # (checkpoint.check_mim_fusion).
        self.register_buffer("fusion_index", torch.tensor(FUSION_HISTORY.index(fusion)))
        self.register_buffer("map_prior_index", torch.tensor(int(self.map_prior)))
        self.register_buffer("map_keys_index", torch.tensor(int(self.penultimate_keys)))
        # The map's contrast and the prior's power likewise: another value computes another feature.
        self.register_buffer("map_scales", torch.tensor([self.map_contrast, self.prior_power]))
        if fusion == "learned_map":
            self.cross = nn.ModuleList([PatchWeighting(width, heads)])
        else:
            self.cross = nn.ModuleList(
                [ResidualAttentionBlock(width, heads, is_cross_attention=True) for _ in range(cross_layers)])
        self.blocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(self_layers)])

    def forward(self, query, patches, out_index=0, visual=None, with_map_pool=False, log_prior=None, map_keys=None):
        """query (B, Q, E), patches (B, M, E), visual v (B, E) (the map fusions) -> the output at
        query position ``out_index`` (B, E); the map fusions read v's position. With
        ``with_map_pool`` (map fusions only) also the map's pool of the patches, sum_m a_m p_m (B, E),
        which MODEL.LOSSES.SUPCON.MAP_SCALE ties to the prompt. ``log_prior`` (B, M): log c of
        ``map_prior``; ``map_keys`` (B, M, E): the map's keys under ``penultimate_keys``."""
        if self.fusion in MAP_FUSIONS:
            if visual is None:
                raise ValueError(f"fusion {self.fusion!r} needs the global visual embedding v")
            keys = self._map_keys(patches, log_prior, map_keys)
            return self._map_forward(query[:, out_index:out_index + 1], patches, visual, with_map_pool, log_prior, keys)
        if with_map_pool:
            raise ValueError(f"fusion {self.fusion!r} has no map over the patches to pool with")
        for blk in self.cross:
            # Eq. 7: softmax(QK^T / sqrt(d)) V, with no residual from the query.
            query = cross_block_forward(blk, query, patches)
        if not self.blocks:
            return query[:, out_index]
        x = torch.cat([query, patches], dim=1)                  # (B, Q + M, E)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only one output row of the last block is used: compute just that row.
        return query_row_forward(self.blocks[-1], x, out_index)

    def _map_keys(self, patches, log_prior, map_keys):
        """The keys of the map (``map_keys`` under ``penultimate_keys``, else the patches), once the
        inputs the module's options need are checked."""
        if self.map_prior and log_prior is None:
            raise ValueError("MultimodalInteraction with map_prior needs log_prior, the encoder's log CLS attention")
        if not self.map_prior and log_prior is not None:
            raise ValueError("MultimodalInteraction without map_prior was given a log_prior")
        if self.penultimate_keys and map_keys is None:
            raise ValueError("MultimodalInteraction with penultimate_keys needs map_keys, the encoder's penultimate "
                             "patch tokens")
        if not self.penultimate_keys and map_keys is not None:
            raise ValueError("MultimodalInteraction without penultimate_keys was given map_keys")
        return patches if map_keys is None else map_keys

    def _map_forward(self, query, patches, visual, with_map_pool=False, log_prior=None, keys=None):
        """query (B, 1, E), patches (B, M, E), v (B, E) -> the feature read at v (B, E): [v; patches]
        through the blocks, v's attention logit over patch m biased by log(M a_m), the other rows
        plain (a uniform map changes nothing). With ``with_map_pool`` also sum_m a_m p_m (B, E).
        The prior is read, not trained through: the encoder's attention stays the encoder's own.
        The map's keys are ``keys`` if given, else the patches."""
        log_prior = None if log_prior is None else log_prior.detach()
        keys = patches if keys is None else keys
        log_map = self.log_prompt_map(query, keys, log_prior)                     # (B, M)
        if with_map_pool:
            # The map again from detached inputs, pooling detached patches: a loss on the pool
            # trains the map's own parameters only, never the encoders.
            query, patches_fixed = query.detach(), patches.detach()
            keys_fixed = patches_fixed if keys is patches else keys.detach()
            pool = torch.einsum("bm,bme->be", self.log_prompt_map(query, keys_fixed, log_prior).exp(),
                                patches_fixed)
            return self._map_forward_biased(log_map, patches, visual), pool
        return self._map_forward_biased(log_map, patches, visual)

    def _map_forward_biased(self, log_map, patches, visual):
        read_bias = map_read_bias(log_map)
        x = torch.cat([visual[:, None].to(patches.dtype), patches], dim=1)          # (B, 1 + M, E)
        for blk in self.blocks[:-1]:
            x = block_forward(blk, x, read_bias)
        return query_row_forward(self.blocks[-1], x, 0, read_bias)

    def log_prompt_map(self, query, patches, log_prior=None):
        """log a (B, M): the prompt's (B, 1, E) map over the patches (B, M, E) in the map fusions,
        log_softmax(contrast * z + power * log c) of logits z standardised over the patches (computed
        in float32), with ``log_prior`` log c (B, M) when the module has ``map_prior``."""
        logits = self.cross[0](query, patches, logits=True)[:, 0].mean(dim=1).float()     # head mean (B, M)
        z = (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + 1e-6)
        z = self.map_contrast * z
        if log_prior is not None:
            z = z + self.prior_power * log_prior.float()
        return z.log_softmax(dim=-1).to(patches.dtype)

    def read_attention_weights(self, query, patches, visual, log_prior=None, map_keys=None):
        """Map fusions: v's attention in each self-attention block, the prompt's bias included, as
        ``forward`` computes it: one (B, H, 1 + M) tensor per block, over [v; patches]. The last is
        where the feature looks: the weights its value mix is made with."""
        if self.fusion not in MAP_FUSIONS:
            raise ValueError(f"fusion {self.fusion!r} has no read row biased by a map")
        keys = self._map_keys(patches, log_prior, map_keys)
        read_bias = map_read_bias(self.log_prompt_map(query[:, :1], keys, log_prior))
        x = torch.cat([visual[:, None].to(patches.dtype), patches], dim=1)
        weights = []
        for i, block in enumerate(self.blocks):
            normed = block.ln_1(x)
            weights.append(few_query_attention_weights(block.attn, normed[:, :1], normed, read_bias)[:, 0])
            if i < len(self.blocks) - 1:
                x = block_forward(block, x, read_bias)
        return weights

    def cross_attention_weights(self, query, patches, visual=None, log_prior=None, map_keys=None):
        """The prompt's weights over the M patches, as ``forward`` computes them: for the map
        fusions one (B, Q, 1, M) tensor, the map a of each query token (with its prior and keys, if
        any); for "attention" a (B, Q, H, M) tensor per cross-attention block, every query token's
        and head's weights."""
        if self.fusion in MAP_FUSIONS:
            keys = self._map_keys(patches, log_prior, map_keys)
            return [torch.stack([self.log_prompt_map(query[:, i:i + 1], keys, log_prior).exp()
                                 for i in range(query.shape[1])], dim=1)[:, :, None]]
        weights = []
        for blk in self.cross:
            weights.append(few_query_attention_weights(blk.attn, blk.ln_1(query), blk.ln_1_kv(patches)))
            query = cross_block_forward(blk, query, patches)
        return weights


class PatchWeighting(nn.Module):
    """The query and key side of a cross-attention block, for ``fusion="learned_map"``: per head h,
    q_h . k_h,m / sqrt(d) over the M patches, q from the text query and k from the patches, each
    pre-normalised (B, Q, E), (B, M, E) -> (B, Q, H, M), or its softmax over the patches. No value or
    output projection: the weights are the whole result."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width)
        self.num_heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)   # a key bias adds a constant per row

    def forward(self, query, patches, logits=False):
        """(B, Q, E), (B, M, E) -> softmax weights (B, Q, H, M), or the logits with ``logits``, with the
        key projection folded into the query side as in ``few_query_attention_weights``."""
        batch, queries, width = query.shape
        q = self.q_proj(self.ln_1(query)).view(batch, queries, self.num_heads, self.head_dim) * self.head_dim ** -0.5
        q = torch.einsum("bqhd,hde->bqhe", q, self.k_proj.weight.view(self.num_heads, self.head_dim, width))
        scores = torch.einsum("bqhe,bme->bqhm", q, self.ln_1_kv(patches))
        return scores if logits else scores.softmax(dim=-1)


def map_read_bias(log_map):
    """v's attention-logit bias over [v; patches] (B, 1 + M) from the map's log a (B, M): 0 on v's own
    key, log(M a_m) on patch m (zero where the map is uniform)."""
    zero = torch.zeros_like(log_map[:, :1])                                   # (B, 1), batch-agnostic for export
    return torch.cat([zero, log_map + math.log(log_map.shape[1])], dim=1)


def query_row_forward(block, x, index, key_bias=None):
    """Output row ``index`` of a self-attention ``ResidualAttentionBlock`` on ``x`` (B, N, E), its
    attention logits over key n raised by ``key_bias`` (B, N) if given.

    Equal to ``block(x)[:, index]`` (``block_forward``'s row 0 with a bias) at a fraction of the
    cost: one query row attends over all N keys, and the MLP runs on one token.
    """
    normed = block.ln_1(x)
    q = x[:, index:index + 1]
    q = q + block.ls_1(few_query_attention(block.attn, normed[:, index:index + 1], normed, key_bias))
    q = q + block.ls_2(block.mlp(block.ln_2(q)))
    return q[:, 0]


def block_forward(block, x, read_bias):
    """A self-attention ``ResidualAttentionBlock`` on ``x`` (B, N, E) whose row 0 (v, the row the
    feature is read from) has ``read_bias`` (B, N) added to its attention logits; the other rows
    attend as in ``block(x)``."""
    normed = block.ln_1(x)
    others = block.attention(normed[:, 1:], k_x=normed, v_x=normed)               # open_clip's own, rows 1..N-1
    read = few_query_attention(block.attn, normed[:, :1], normed, read_bias)       # row 0, biased
    x = x + block.ls_1(torch.cat([read, others], dim=1))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def cross_block_forward(block, query, patches):
    """A cross-attention ``ResidualAttentionBlock`` with no residual from the query (Eq. 7):
    ``ls_1(attn(ln_1(query), ln_1_kv(patches)))``, then the block's MLP residual."""
    x = block.ls_1(few_query_attention(block.attn, block.ln_1(query), block.ln_1_kv(patches)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def few_query_attention(attn, q, kv, key_bias=None):
    """``attn(q, kv, kv)[0]`` of a batch-first ``nn.MultiheadAttention``, for few queries, with
    ``key_bias`` (B, N) added to the logits if given.

    q (B, Q, E), kv (B, N, E) -> (B, Q, E). The key and value projections are folded into the
    query side instead of being applied to the N tokens (cost H*Q*N*E rather than N*E^2, for H
    heads): per head h, q_h . (W_k,h x_n + b_k,h) = (W_k,h^T q_h) . x_n + const, and the
    constant drops out of the softmax; sum_n a_n (W_v,h x_n + b_v,h) = W_v,h (sum_n a_n x_n) + b_v,h
    as the weights a_n sum to one. Cheaper than the projections while Q * H < E (the MIM: Q = 1
    pooled prompt or the prompt's tokens, H = 8, E = 512). No attention dropout (open_clip has none).
    """
    batch, queries, width = q.shape
    per_head = (attn.num_heads, attn.head_dim, width)
    weights = few_query_attention_weights(attn, q, kv, key_bias)    # (B, Q, H, N)
    context = torch.einsum("bqhn,bne->bqhe", weights, kv)          # sum_n a_n x_n: (B, Q, H, E)
    w_v = attn.in_proj_weight.chunk(3)[2]
    b_v = attn.in_proj_bias.chunk(3)[2]
    out = torch.einsum("bqhe,hde->bqhd", context, w_v.view(per_head)).reshape(batch, queries, width) + b_v
    return attn.out_proj(out)


def few_query_attention_weights(attn, q, kv, key_bias=None):
    """The attention weights a (B, Q, H, N) ``few_query_attention`` uses: per head h,
    softmax_n(q_h . k_h,n / sqrt(d) + key_bias_n), computed with the key projection folded into the query."""
    batch, queries, width = q.shape
    per_head = (attn.num_heads, attn.head_dim, width)
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)                     # (E, E) each
    b_q = attn.in_proj_bias.chunk(3)[0]
    q = F.linear(q, w_q, b_q).view(batch, queries, *per_head[:2]) * attn.head_dim ** -0.5
    q = torch.einsum("bqhd,hde->bqhe", q, w_k.view(per_head))      # W_k,h^T q_h: (B, Q, H, E)
    logits = torch.einsum("bqhe,bne->bqhn", q, kv)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(logits.dtype)
    return logits.softmax(dim=-1)
