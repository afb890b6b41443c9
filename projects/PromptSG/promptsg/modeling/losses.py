"""FastReID's ID and triplet losses and its accuracy log, without stopping the host for the GPU.

FastReID's ``cross_entropy_loss`` divides by the number of non-zero per-sample losses, counted with
``nonzero()``, and its ``log_accuracy`` turns the accuracy into a Python float. Each reads a value
back from the GPU in the middle of the forward pass, so the host cannot queue the backward pass
while the forward still runs. Its ``triplet_loss`` builds the target with ``Tensor.resize_as_``,
which torch.compile cannot trace. Here all three give FastReID's values (tests/test_fast_paths.py
compares them) and stay on the device:

  * ``cross_entropy_loss``: FastReID's label smoothing, 1 - eps on the true class and eps / (C - 1)
    on the others, is PyTorch's ``label_smoothing = eps * C / (C - 1)``; the non-zero count is a
    device tensor.
  * ``triplet_loss``: FastReID's distances and example mining, then the ranking loss.
  * ``top1_accuracy``: a device tensor, logged by ``deferred_log.DeferredScalars`` one step later.
"""
import importlib

import torch
import torch.nn.functional as F
from fastreid.modeling.losses import cross_entropy_loss as fastreid_cross_entropy_loss
from fastreid.modeling.losses.utils import cosine_dist, euclidean_dist

# The module, not the package's function of the same name.
_triplet = importlib.import_module("fastreid.modeling.losses.triplet_loss")


def cross_entropy_loss(logits, targets, eps, alpha=0.2):
    """FastReID's label-smoothed ID loss, (B, C) logits and (B,) targets -> scalar.

    eps < 0 (FastReID's adaptive smoothing, scaled by ``alpha``) is passed to FastReID's own
    function, which synchronises.
    """
    num_classes = logits.shape[1]
    smoothing = eps * num_classes / (num_classes - 1)
    if eps < 0 or smoothing > 1:
        return fastreid_cross_entropy_loss(logits, targets, eps, alpha)
    per_sample = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=smoothing)
    nonzero = (per_sample != 0).sum().clamp(min=1)                     # as FastReID: mean over non-zero
    return per_sample.sum() / nonzero


def triplet_loss(embedding, targets, margin, norm_feat, hard_mining):
    """FastReID's batch triplet loss: (B, D) embeddings, (B,) targets -> scalar.

    Hardest (or softmax-weighted) positive and negative per anchor; margin > 0: ranking loss with
    that margin, else the soft margin, with FastReID's fallback to margin 0.3 where it overflows.
    """
    dist = cosine_dist(embedding, embedding) if norm_feat else euclidean_dist(embedding, embedding)
    is_pos = (targets[:, None] == targets[None, :]).float()
    mining = _triplet.hard_example_mining if hard_mining else _triplet.weighted_example_mining
    dist_ap, dist_an = mining(dist, is_pos, 1 - is_pos)
    ones = torch.ones_like(dist_an)
    if margin > 0:
        return F.margin_ranking_loss(dist_an, dist_ap, ones, margin=margin)
    loss = F.soft_margin_loss(dist_an - dist_ap, ones)
    return torch.where(torch.isinf(loss), F.margin_ranking_loss(dist_an, dist_ap, ones, margin=0.3), loss)


def top1_accuracy(logits, targets):
    """Share of rows whose highest logit is the target class, as a 0-dim tensor."""
    return (logits.argmax(dim=1) == targets).float().mean()
