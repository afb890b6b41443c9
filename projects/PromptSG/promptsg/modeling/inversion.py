"""Inversion network f_theta (Sec. 4.1): global visual embedding v -> pseudo word token s*."""
import torch
from torch import nn

from ..utils.distributed import GlobalBatchNorm1d


class InversionNet(nn.Module):
    """f_theta: a 3-layer MLP with 512-d hidden states and BatchNorm after the last layer.

    Args:
        embed_dim: width E of CLIP's joint space (the input v).
        token_dim: width D of the text tower's token embeddings (the output s*).
        hidden_dim: hidden width (512 in the paper).
    """

    def __init__(self, embed_dim, token_dim, hidden_dim=512):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, token_dim),
        )
        self.bn = GlobalBatchNorm1d(token_dim)   # global-batch statistics over processes

    def forward(self, v):
        """(B, E) -> s* (B, D)."""
        return self.bn(self.mlp(v))

    @torch.no_grad()
    def init_like_token_embeddings(self, table):
        """Start s* distributed like the text tower's word embeddings ``table`` (V, D): the
        BatchNorm's scale and shift become their per-dimension standard deviation and mean
        (PyTorch's default, 1 and 0, gives s* a norm of about sqrt(D), far above any word's)."""
        self.bn.weight.copy_(table.float().std(dim=0))
        self.bn.bias.copy_(table.float().mean(dim=0))
