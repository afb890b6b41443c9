"""Symmetric supervised contrastive loss L_SupCon = L_i2t + L_t2i (Sec. 4.1, Eq. 4-6).

Positives P(n) of sample n are the batch samples with its identity (n included). The similarity
is the cosine over a temperature tau (Eq. 1). Each anchor's log-likelihoods are summed over its
positives, as Eq. 5-6 write them (``positives="sum"``); ``positives="mean"`` divides by their
number, as Khosla et al.'s SupCon does (a K-times weaker loss and gradient with K images per
identity). CLIP-ReID's stage 1 (``clip_reid.py``) uses the same loss on raw, unnormalised
features at temperature 1 (``normalize=False``), averaged over the positives.
"""
import torch
import torch.nn.functional as F

POSITIVE_REDUCTIONS = ("sum", "mean")


def supcon_loss(anchors, candidates, targets, temperature, positives="sum", normalize=True):
    """One direction: -mean_n reduce_{p in P(n)} log softmax_i(sim(a_n, c_i) / tau)[p].

    anchors, candidates: (N, E); targets: (N,) identities; positives: "sum" (Eq. 5-6) or "mean";
    normalize: sim is the cosine (Eq. 1), else the dot product of the raw features.
    """
    a, c = anchors.float(), candidates.float()
    if normalize:
        a, c = F.normalize(a, dim=1), F.normalize(c, dim=1)
    log_prob = F.log_softmax(a @ c.t() / temperature, dim=1)            # (N, N)
    is_positive = (targets[:, None] == targets[None, :]).float()
    per_anchor = (log_prob * is_positive).sum(1)
    if positives == "mean":
        per_anchor = per_anchor / is_positive.sum(1)
    return -per_anchor.mean()


def symmetric_supcon_loss(image_embeds, text_embeds, targets, temperature, i2t=True, t2i=True,
                          positives="sum", normalize=True):
    """L_SupCon = L_i2t (images as anchors, Eq. 5) + L_t2i (prompts as anchors, Eq. 6)."""
    loss = image_embeds.new_zeros((), dtype=torch.float32)
    if i2t:
        loss = loss + supcon_loss(image_embeds, text_embeds, targets, temperature, positives, normalize)
    if t2i:
        loss = loss + supcon_loss(text_embeds, image_embeds, targets, temperature, positives, normalize)
    return loss
