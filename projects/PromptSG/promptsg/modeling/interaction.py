"""Multimodal interaction module, MIM (Sec. 4.2, Eq. 7, Table 5).

Text-as-query cross-attention over the patch embeddings, then self-attention transformer blocks
over [x; patches], read at x's position. The blocks are open_clip's ``ResidualAttentionBlock``
(pre-norm attention + MLP).

Design choices the paper leaves open (the project README, "Design choices"):
  * how the cross-attention's result enters the blocks (``fusion``, MODEL.PROMPTSG.MIM.FUSION):
    by default ("reweight") its weights softmax(QK^T / sqrt(d)) re-weight the patch tokens and x is
    the global visual embedding v, so the prompt chooses which patches count and its own content
    never reaches the feature; "attention" is Eq. 7 as written (x = A(q, P)); "visual_residual"
    x = v + A(q, P); "query_residual" x = q + A(q, P) (open_clip's cross block, the wiring before
    2026-12-04, with which the composed prompt's s* carried the identity into the feature);
  * width = CLIP's joint embedding width E (512 for ViT-B/16), the space both the text
    embedding l_p and the projected patch tokens live in;
  * query = the pooled EOT text embedding (one token), or every prompt token (``query="tokens"``,
    read at the EOT position);
  * the self-attention blocks attend over x and the patches: over a single token alone,
    self-attention would be an identity mixing.

Two exact fast paths (tests/test_promptsg_model.py, tests/test_fast_paths.py): only the read row
of the last block is computed (``query_row_forward``), and attention with a few queries never
projects the keys and values (``few_query_attention``, ``PatchWeighting``). ``cross_attention_weights``
gives the cross-attention weights over the patches that the forward uses (the attention maps of
Fig. 1 and 5, tools/attention_maps.py) without touching that path.
"""
import math

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


FUSIONS = ("query_residual", "attention", "visual_residual", "reweight", "bias", "gate", "pool",
           "clip_bias", "clip_pool", "zbias2", "zbias4", "zclip2", "zclip4", "zrow2", "zrow4", "zmix2", "zmix4", "zcliprow4", "zclipsc4", "zcliprowsc4",
           "zcliprowsc2", "zmixrowsc2", "zmixrowsc4")
# The fusions whose cross-attention is only the prompt's map over the patches (``PatchWeighting``),
# which then decides what [v; patches] contributes to the feature read at v.
MAP_FUSIONS = ("reweight", "bias", "gate", "pool", "clip_bias", "clip_pool", "zbias2", "zbias4", "zclip2", "zclip4", "zrow2", "zrow4", "zmix2", "zmix4", "zcliprow4", "zclipsc4", "zcliprowsc4", "zcliprowsc2", "zmixrowsc2", "zmixrowsc4")


class MultimodalInteraction(nn.Module):
    """Cross-attention (text queries, patch keys/values) followed by self-attention blocks.

    Args:
        width: token width E.
        heads: attention heads.
        cross_layers: number of cross-attention blocks (>= 1; exactly 1 for ``reweight``).
        self_layers: number of self-attention blocks after them.
        fusion: how the cross-attention's result enters the blocks (MODEL.PROMPTSG.MIM.FUSION).
            Each cross-attention block is pre-norm attention and MLP with a residual stream; the
            fusions differ in where that stream starts, or skip it:
              "query_residual": at the text query, x = q + A(q, P) (open_clip's cross block);
                  the query's own content (s* with the composed prompt) reaches the feature.
              "attention": at nothing, x = A(q, P) (Eq. 7 as written): the feature depends on the
                  query only through the attention weights softmax(QK^T / sqrt(d)).
              "visual_residual": at the global visual embedding, x = v + A(q, P): v carried, the
                  text choosing which patches are added to it.
              "reweight": no value path; the weights, averaged over heads and scaled to mean one,
                  re-weight the patch tokens, and [v; weighted patches] runs through the blocks,
                  read at v's position.
    """

    def __init__(self, width, heads=8, cross_layers=1, self_layers=2, fusion="reweight"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"MultimodalInteraction fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if cross_layers < 1:
            raise ValueError("MultimodalInteraction needs at least one cross-attention layer")
        if fusion in MAP_FUSIONS and (cross_layers != 1 or self_layers < 1):
            raise ValueError(f"fusion {fusion!r} needs exactly one cross-attention layer and self-attention "
                             "blocks to read v from")
        self.fusion = fusion
        # Saved with the weights, so that a checkpoint is never evaluated under another wiring
        # (checkpoint.check_mim_fusion); the same parameters serve three of the fusions.
        self.register_buffer("fusion_index", torch.tensor(FUSIONS.index(fusion)))
        if fusion in MAP_FUSIONS:
            self.cross = nn.ModuleList([PatchWeighting(width, heads)])
        else:
            self.cross = nn.ModuleList(
                [ResidualAttentionBlock(width, heads, is_cross_attention=True) for _ in range(cross_layers)])
        self.blocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(self_layers)])
        # "pool": the prompt-weighted pool of the normalised patch tokens, projected, beside v's output.
        self.pool_proj = nn.Linear(width, width) if fusion in ("pool", "clip_pool") else None

    def forward(self, query, patches, out_index=0, visual=None):
        """query (B, Q, E), patches (B, M, E), visual v (B, E) (``visual_residual``, ``reweight``)
        -> the output at query position ``out_index`` (B, E); ``reweight`` reads v's position."""
        if self.fusion in MAP_FUSIONS and self.fusion != "reweight":
            return self._map_forward(query[:, out_index:out_index + 1], patches, visual)
        if self.fusion == "reweight":
            weights = self.cross[0](query[:, out_index:out_index + 1], patches)[:, 0].mean(dim=1)   # (B, M)
            patches = patches * (weights * patches.shape[1])[..., None]                            # mean weight 1
            query, out_index = visual[:, None].to(patches.dtype), 0
        else:
            stream = self._stream_start(query, visual)
            for blk in self.cross:
                # Eq. 7: softmax(QK^T / sqrt(d)) V, added to the stream the fusion starts from.
                stream = query = cross_block_forward(blk, query, patches, stream)
        if not self.blocks:
            return query[:, out_index]
        x = torch.cat([query, patches], dim=1)                  # (B, Q + M, E)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only one output row of the last block is used: compute just that row.
        return query_row_forward(self.blocks[-1], x, out_index)

    def _map_forward(self, query, patches, visual):
        """The "bias", "gate" and "pool" fusions: the prompt's map a (B, M), the head mean of
        softmax(QK^T / sqrt(d)) of the query (B, 1, E) over the patches (B, M, E), decides what
        [v; patches] gives the feature read at v (B, E), after every LayerNorm:
          "bias": log(M a_m) is added to every attention logit over patch m in the blocks
              (attention proportional to a_m exp(q.k_m); v's key gets 0, a uniform map changes nothing);
          "gate": the blocks' normalised patch tokens are scaled by M a_m on their way to the values;
          "pool": plain blocks, plus a projection of the map's pool sum_m a_m LN(p_m) of the
              normalised patch tokens."""
        log_map = self.log_prompt_map(query, patches)
        weights = log_map.exp()                                                  # (B, M), sums to 1
        if self.fusion[-3:-1] == "sc":
            self.last_pooled = torch.einsum("bm,bme->be", weights, patches)    # exploration: SupCon on it
        x = torch.cat([visual[:, None].to(patches.dtype), patches], dim=1)     # (B, 1 + M, E)
        key_bias = value_gate = None
        zeros = log_map.new_zeros(len(log_map), 1)
        if self.fusion in ("bias", "clip_bias") or self.fusion.startswith("z"):
            key_bias = torch.cat([zeros, log_map + math.log(log_map.shape[1])], dim=1)   # (B, 1 + M)
        elif self.fusion == "gate":
            value_gate = torch.cat([zeros + 1, weights * weights.shape[1]], dim=1)      # (B, 1 + M)
        for blk in self.blocks[:-1]:
            x = block_forward(blk, x, key_bias, value_gate, read_row_only=self.fusion.startswith("zrow") or "row" in self.fusion)
        out = query_row_forward(self.blocks[-1], x, 0, key_bias, value_gate)
        if self.pool_proj is not None:
            pooled = torch.einsum("bm,bme->be", weights, self.cross[0].ln_1_kv(patches))
            out = out + self.pool_proj(pooled)
        return out

    def log_prompt_map(self, query, patches):
        """log a (B, M): the prompt's map over the patches that the map fusions use."""
        weighting = self.cross[0]
        if self.fusion.startswith("clip_"):
            # CLIP's own image-text similarity in the joint space, at CLIP's temperature: no parameters.
            sims = torch.einsum("be,bme->bm", F.normalize(query[:, 0], dim=-1), F.normalize(patches, dim=-1))
            log_map = (sims / 0.07).log_softmax(dim=-1)
        elif self.fusion.startswith("z"):
            # The head-mean logits standardised over the patches, times a fixed contrast: a map that
            # cannot be flattened, only moved.
            def standardised(t):
                return (t - t.mean(dim=-1, keepdim=True)) / (t.std(dim=-1, keepdim=True) + 1e-6)

            cosines = torch.einsum("be,bme->bm", F.normalize(query[:, 0], dim=-1), F.normalize(patches, dim=-1))
            if self.fusion.startswith("zclip"):
                logits = cosines
            elif self.fusion.startswith("zmix"):
                logits = standardised(weighting(query, patches, logits=True)[:, 0].mean(dim=1)) + standardised(cosines)
            else:
                logits = weighting(query, patches, logits=True)[:, 0].mean(dim=1)      # (B, M)
            z = (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + 1e-6)
            log_map = (float(self.fusion[-1]) * z).log_softmax(dim=-1)
        else:
            # log a = log mean_h softmax_h, from the log-softmax: finite where a weight underflows.
            log_map = torch.logsumexp(weighting(query, patches, log=True)[:, 0], dim=1) - math.log(weighting.num_heads)
        return log_map

    def cross_attention_weights(self, query, patches, visual=None):
        """The weights of each cross-attention block, as ``forward`` computes them: a list of
        (B, Q, H, M) tensors, the attention of every query token and head over the M patches."""
        if self.fusion in ("reweight", "bias", "gate", "pool"):
            return [self.cross[0](query, patches)]
        if self.fusion in MAP_FUSIONS:
            return [torch.stack([self.log_prompt_map(query[:, i:i + 1], patches).exp()
                                 for i in range(query.shape[1])], dim=1)[:, :, None]]
        weights = []
        stream = self._stream_start(query, visual)
        for blk in self.cross:
            weights.append(few_query_attention_weights(blk.attn, blk.ln_1(query), blk.ln_1_kv(patches)))
            stream = query = cross_block_forward(blk, query, patches, stream)
        return weights

    def _stream_start(self, query, visual):
        """Where the cross-attention's residual stream starts: the query, nothing, or v (B, 1, E)."""
        if self.fusion == "query_residual":
            return query
        if self.fusion == "attention":
            return None
        if visual is None:
            raise ValueError("fusion 'visual_residual' needs the global visual embedding v")
        return visual[:, None].to(query.dtype)


class PatchWeighting(nn.Module):
    """The query and key side of a cross-attention block, for ``fusion="reweight"``: per head h,
    softmax_m(q_h . k_h,m / sqrt(d)) over the M patches, q from the text query and k from the
    patches, each pre-normalised (B, Q, E), (B, M, E) -> (B, Q, H, M). No value or output projection:
    the weights are the whole result."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width)
        self.num_heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)   # a key bias adds a constant per row

    def forward(self, query, patches, log=False, logits=False):
        """(B, Q, E), (B, M, E) -> (B, Q, H, M) (their logarithms with ``log``), with the key
        projection folded into the query side as in ``few_query_attention_weights``."""
        batch, queries, width = query.shape
        q = self.q_proj(self.ln_1(query)).view(batch, queries, self.num_heads, self.head_dim) * self.head_dim ** -0.5
        q = torch.einsum("bqhd,hde->bqhe", q, self.k_proj.weight.view(self.num_heads, self.head_dim, width))
        scores = torch.einsum("bqhe,bme->bqhm", q, self.ln_1_kv(patches))
        if logits:
            return scores
        return scores.log_softmax(dim=-1) if log else scores.softmax(dim=-1)


def query_row_forward(block, x, index, key_bias=None, value_gate=None):
    """Output row ``index`` of a self-attention ``ResidualAttentionBlock`` on ``x`` (B, N, E).

    Equal to ``block(x)[:, index]`` (``block_forward`` with a key bias or value gate) at a
    fraction of the cost: one query row attends over all N keys, and the MLP runs on one token.
    """
    normed = block.ln_1(x)
    q = x[:, index:index + 1]
    q = q + block.ls_1(few_query_attention(block.attn, normed[:, index:index + 1], normed, key_bias, value_gate))
    q = q + block.ls_2(block.mlp(block.ln_2(q)))
    return q[:, 0]


def block_forward(block, x, key_bias=None, value_gate=None, read_row_only=False):
    """A self-attention ``ResidualAttentionBlock`` on ``x`` (B, N, E) whose attention logits over key
    n get ``key_bias`` (B, N) added and whose normalised tokens are scaled by ``value_gate`` (B, N)
    before the value projection; both None: ``block(x)``."""
    attn = block.attn
    normed = block.ln_1(x)
    values = normed if value_gate is None else normed * value_gate[..., None]
    q, k, v = (F.linear(t, w, b).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)      # (B, H, N, d)
               for t, w, b in zip((normed, normed, values), attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)))
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)           # (B, 1, 1, N)
    if mask is not None and read_row_only:
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1, x.shape[1] - 1, x.shape[1])], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def cross_block_forward(block, query, patches, stream):
    """A cross-attention ``ResidualAttentionBlock`` whose residual stream starts at ``stream``
    (B, Q, E), or at nothing (None): ``stream + ls_1(attn(ln_1(query), ln_1_kv(patches)))``, then the
    block's MLP residual. With ``stream=query`` it is ``block(query, k_x=patches, v_x=patches)``."""
    x = block.ls_1(few_query_attention(block.attn, block.ln_1(query), block.ln_1_kv(patches)))
    if stream is not None:
        x = stream + x
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def few_query_attention(attn, q, kv, key_bias=None, value_gate=None):
    """``attn(q, kv, kv)[0]`` of a batch-first ``nn.MultiheadAttention``, for few queries; with
    ``key_bias`` (B, N) added to the logits and ``value_gate`` (B, N) scaling the tokens before the
    value projection (``block_forward``'s attention).

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
    if value_gate is not None:
        weights = weights * value_gate[:, None, None, :]           # W_v (g_n x_n): the gate folds into a_n
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
