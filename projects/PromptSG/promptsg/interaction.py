"""Multimodal interaction module, MIM (Sec. 4.2, Eq. 7, Table 5).

Text-as-query cross-attention over the patch embeddings, then self-attention transformer
blocks over [query; patches]; the final representation is the query position of the last block.
The blocks are open_clip's ``ResidualAttentionBlock`` (pre-norm attention + MLP).

Design choices the paper leaves open (see the project README):
  * width = CLIP's joint embedding width E (512 for ViT-B/16), the space both the text
    embedding l_p and the projected patch tokens live in;
  * query = the pooled EOT text embedding (one token), or every prompt token (``query="tokens"``,
    final feature = the EOT position);
  * the self-attention blocks attend over the query and the patches: with a single query token,
    self-attention over the query alone would be an identity mixing.
"""
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


class MultimodalInteraction(nn.Module):
    """Cross-attention (text queries, patch keys/values) followed by self-attention blocks.

    Args:
        width: token width E.
        heads: attention heads.
        cross_layers: number of cross-attention blocks (>= 1).
        self_layers: number of self-attention blocks after them.
    """

    def __init__(self, width, heads=8, cross_layers=1, self_layers=2):
        super().__init__()
        if cross_layers < 1:
            raise ValueError("MultimodalInteraction needs at least one cross-attention layer")
        self.cross = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, is_cross_attention=True) for _ in range(cross_layers)])
        self.blocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(self_layers)])

    def forward(self, query, patches, out_index=0):
        """query (B, Q, E), patches (B, M, E) -> the output at query position ``out_index`` (B, E)."""
        for blk in self.cross:
            query = blk(query, k_x=patches, v_x=patches)         # Eq. 7: softmax(QK^T/sqrt(d))V
        if not self.blocks:
            return query[:, out_index]
        x = torch.cat([query, patches], dim=1)                  # (B, Q + M, E)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # Only one output row of the last block is used: compute just that row.
        return query_row_forward(self.blocks[-1], x, out_index)


def query_row_forward(block, x, index):
    """Output row ``index`` of a self-attention ``ResidualAttentionBlock`` on ``x`` (B, N, E).

    Equal to ``block(x)[:, index]`` at a fraction of the cost: one query row attends over
    all N keys, and the MLP runs on one token.
    """
    normed = block.ln_1(x)
    q = x[:, index:index + 1]
    q = q + block.ls_1(block.attention(q_x=normed[:, index:index + 1], k_x=normed, v_x=normed))
    q = q + block.ls_2(block.mlp(block.ln_2(q)))
    return q[:, 0]
