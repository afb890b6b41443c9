"""Symmetric supervised contrastive loss L_SupCon = L_i2t + L_t2i (Sec. 4.1, Eq. 4-6).

Positives P(n) of sample n are the batch samples with its identity (n included); each anchor's
log-likelihood is averaged over its positives, as in Khosla et al.'s SupCon (the paper's Eq. 5-6
write a plain sum; the mean keeps the scale independent of the instances per identity).
"""
import torch
import torch.nn.functional as F


def supcon_loss(anchors, candidates, targets, temperature):
    """One direction: -mean_n mean_{p in P(n)} log softmax_i(sim(a_n, c_i) / tau)[p].

    anchors, candidates: (N, E); targets: (N,) identities.
    """
    a = F.normalize(anchors.float(), dim=1)
    c = F.normalize(candidates.float(), dim=1)
    log_prob = F.log_softmax(a @ c.t() / temperature, dim=1)            # (N, N)
    positives = (targets[:, None] == targets[None, :]).float()
    return -((log_prob * positives).sum(1) / positives.sum(1)).mean()


def symmetric_supcon_loss(image_embeds, text_embeds, targets, temperature=0.07, i2t=True, t2i=True):
    """L_SupCon = L_i2t (images as anchors, Eq. 5) + L_t2i (prompts as anchors, Eq. 6)."""
    loss = image_embeds.new_zeros((), dtype=torch.float32)
    if i2t:
        loss = loss + supcon_loss(image_embeds, text_embeds, targets, temperature)
    if t2i:
        loss = loss + supcon_loss(text_embeds, image_embeds, targets, temperature)
    return loss
