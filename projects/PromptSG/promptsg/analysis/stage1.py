"""How far CLIP-ReID's stage 1 got, against chance and against what its features allow.

Stage 1 ties one text feature per identity to the frozen image features (``stage1_loss``), but the
text features can only be what the frozen text tower makes of four context tokens. Four reference
points on the same features and the same batches tell apart a prompt learner that is held back by
the text tower from one held back by the features themselves:

    chance        every similarity equal: 2 log(batch) a batch, averaged over the epoch's batches
    floor         the least any per-identity text can reach: an item whose identity appears k times
                  in its batch shares its probability among k equal positives, log k each direction
    class means   each identity's mean image feature as its text feature (no training)
    free vectors  one unconstrained vector per identity, trained with the same loss and batches
                  (from the class means, scaled to the learned text features' mean norm): the
                  lowest loss any text tower could reach here

``tools/probe_stage1.py`` prints them beside the learned prompts' own loss.
"""
import math

import torch
import torch.nn.functional as F

from ..modeling.clip_reid import stage1_loss


def batches(num_images, batch, generator):
    """One epoch's shuffled batches, the remainder a smaller last batch (as stage 1 draws them)."""
    order = torch.randperm(num_images, generator=generator)
    return [order[start:start + batch] for start in range(0, num_images, batch)]


def epoch_chance(num_images, batch):
    """The epoch-mean stage-1 loss when every similarity is equal."""
    sizes = [min(batch, num_images - start) for start in range(0, num_images, batch)]
    return sum(2 * math.log(size) for size in sizes) / len(sizes)


def epoch_floor(labels, batch, seed=0):
    """The epoch-mean stage-1 loss's lower bound on ``epoch_loss``'s batches: 2 log k for an item
    whose identity appears k times in its batch, averaged over the batch, then over the epoch."""
    rows = batches(len(labels), batch, torch.Generator().manual_seed(seed))
    total = 0.0
    for r in rows:
        same = (labels[r][:, None] == labels[r][None, :]).sum(1).double()
        total += float(2 * same.log().mean())
    return total / len(rows)


@torch.no_grad()
def epoch_loss(feats, labels, text, batch, seed=0):
    """The epoch-mean stage-1 loss of fixed per-identity text features ``text`` (C, E)."""
    rows = batches(len(feats), batch, torch.Generator().manual_seed(seed))
    return sum(float(stage1_loss(feats[r], text[labels[r]], labels[r])) for r in rows) / len(rows)


def class_means(feats, labels):
    """(C, E): each identity's mean image feature; labels are 0 .. C-1."""
    num = int(labels.max()) + 1
    sums = torch.zeros(num, feats.shape[1], dtype=feats.dtype).index_add_(0, labels, feats)
    return sums / torch.bincount(labels, minlength=num).clamp(min=1)[:, None].to(feats.dtype)


def fit_free_text(feats, labels, batch, norm, epochs=120, lr=0.01, seed=0):
    """Free per-identity text vectors of norm ``norm``, trained with stage 1's loss and batches
    (Adam at a constant ``lr``, from the class means). Returns (vectors (C, E), epoch-mean losses)."""
    init = F.normalize(class_means(feats, labels), dim=1)
    direction = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.Adam([direction], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        rows = batches(len(feats), batch, generator)
        total = 0.0
        for r in rows:
            text = norm * F.normalize(direction[labels[r]], dim=1)
            loss = stage1_loss(feats[r], text, labels[r])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(rows))
    return (norm * F.normalize(direction.detach(), dim=1)), losses


def mean_pairwise_cosine(x):
    """Mean cosine over the distinct pairs of rows of ``x``."""
    n = F.normalize(x, dim=1)
    cos = n @ n.t()
    return float((cos.sum() - cos.diagonal().sum()) / (len(x) * (len(x) - 1)))


def stage1_reference_points(feats, labels, text, batch, free_epochs=120, free_lr=0.01, seed=0):
    """The module docstring's figures for image features ``feats`` (N, E), their identities
    ``labels`` (N,) and the learned text features ``text`` (C, E)."""
    feats, labels, text = feats.float().cpu(), labels.cpu(), text.float().cpu()
    norm = float(text.norm(dim=1).mean())
    free, _ = fit_free_text(feats, labels, batch, norm, free_epochs, free_lr, seed)
    return {
        "images": len(feats), "identities": len(text), "batch": batch,
        "image_norm": float(feats.norm(dim=1).mean()), "text_norm": norm,
        "image_mean_cos": mean_pairwise_cosine(feats), "text_mean_cos": mean_pairwise_cosine(text),
        "chance": epoch_chance(len(feats), batch), "floor": epoch_floor(labels, batch, seed),
        "learned_prompts": epoch_loss(feats, labels, text, batch, seed),
        "class_means": epoch_loss(feats, labels, class_means(feats, labels), batch, seed),
        "free_vectors": epoch_loss(feats, labels, free, batch, seed),
        "free_epochs": free_epochs, "free_lr": free_lr,
    }
