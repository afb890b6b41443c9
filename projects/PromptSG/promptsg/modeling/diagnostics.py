"""What a researcher watches while PromptSG trains: is the image-prompt alignment learning?

``alignment_diagnostics`` turns one training batch into a few scalars, all device tensors (no
host read), logged by the meta-architecture into FastReID's event storage (metrics.json,
tensorboard; ``AlignmentPrinter`` adds them to log.txt) and printed by ``tools/probe_alignment.py``
for a checkpoint:

  * ``align_i2t_top1`` / ``align_t2i_top1``: share of images whose most similar prompt in the batch
    (cosine) belongs to their identity, and of prompts whose most similar image does. Chance is
    about K / B for K images per identity in a batch of B (4 / 64 = 0.06).
  * ``collapse_v_cos`` / ``collapse_text_cos``: mean pairwise cosine of the image embeddings v and of
    the prompt embeddings l_p over the batch (i != j). Near 1: every embedding points one way and a
    cosine loss sees no differences (collapse). ``collapse_v_cos`` is logged by every model,
    the visual-only baseline included.
  * ``pseudo_token_norm_ratio``: mean norm of s* over the mean norm of the text tower's token
    embeddings. Far above 1, s* dominates the prompt as no real word does.
"""
import json
import logging
import math
import os

import torch
import torch.nn.functional as F
from fastreid.utils.events import EventWriter, get_event_storage

DIAGNOSTICS = ("cls_accuracy", "align_i2t_top1", "align_t2i_top1", "collapse_v_cos", "collapse_text_cos",
               "pseudo_token_norm_ratio")


def mean_pairwise_cosine(x):
    """Mean cosine similarity of the rows of x (N, E) over the pairs i != j."""
    x = F.normalize(x.float(), dim=1)
    n = len(x)
    total = x.sum(0)
    return ((total @ total) - n) / (n * (n - 1))          # sum_{i != j} x_i . x_j / (N (N - 1))


def in_batch_top1(similarity, targets):
    """(share of rows, share of columns) whose highest similarity is a same-identity entry."""
    same = targets[:, None] == targets[None, :]
    rows = same.gather(1, similarity.argmax(1, keepdim=True)).float().mean()
    cols = same.gather(0, similarity.argmax(0, keepdim=True)).float().mean()
    return rows, cols


@torch.no_grad()
def alignment_diagnostics(image_embeds, text_embeds, targets, pseudo_tokens=None, token_norm=None):
    """The scalars of the module docstring for one batch; v, l_p (N, E), targets (N,), s* (N, D)."""
    similarity = F.normalize(image_embeds.float(), dim=1) @ F.normalize(text_embeds.float(), dim=1).t()
    i2t, t2i = in_batch_top1(similarity, targets)
    out = {
        "align_i2t_top1": i2t,
        "align_t2i_top1": t2i,
        "collapse_v_cos": mean_pairwise_cosine(image_embeds),
        "collapse_text_cos": mean_pairwise_cosine(text_embeds),
    }
    if pseudo_tokens is not None and token_norm is not None:
        out["pseudo_token_norm_ratio"] = pseudo_tokens.float().norm(dim=1).mean() / token_norm
    return out


class AlignmentPrinter(EventWriter):
    """Prints the training accuracy and the alignment diagnostics (medians over the last ``window``
    iterations) on a line of their own, after FastReID's loss line, whenever the writers write."""

    def __init__(self, window=20):
        self.logger = logging.getLogger(__name__)
        self.window = window

    def write(self):
        storage = get_event_storage()
        histories = storage.histories()
        values = [f"{k}: {histories[k].median(self.window):.4g}" for k in DIAGNOSTICS if k in histories]
        if values:
            self.logger.info(" epoch/iter: %d/%d  %s", storage.epoch, storage.iter, "  ".join(values))


def supcon_levels(cfg):
    """(chance, floor) of the logged ``loss_supcon`` for ``cfg``'s training batch.

    Chance: every similarity equal, log N per positive for N images in the batch. Floor: all of
    an anchor's probability on its K positives, evenly, log K per positive. Summed over the K
    positives (POSITIVES sum) or averaged, for each direction used, times lambda.
    """
    sc = cfg.MODEL.LOSSES.SUPCON
    batch, per_id = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    factor = sc.SCALE * (int(sc.I2T) + int(sc.T2I)) * (per_id if sc.POSITIVES == "sum" else 1)
    return factor * math.log(batch), factor * math.log(per_id)


def last_logged(metrics_path, keys=("loss_supcon",) + DIAGNOSTICS):
    """The last value of each key in FastReID's metrics.json (one JSON record per line; training
    values are medians of the last 20 iterations), with the iteration it was written at."""
    found = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            found.update({k: (record[k], record["iteration"]) for k in keys if k in record})
    return found


def alignment_report(output_dir):
    """What a run's metrics.json says about the alignment at the end of its training: the last
    logged ``loss_supcon`` beside its chance level and floor (``supcon_levels``) and the
    diagnostics, as a dict and a one-line summary of the L_SupCon part ("" without L_SupCon)."""
    from fastreid.config import get_cfg

    from ..config import add_promptsg_config

    cfg = add_promptsg_config(get_cfg())
    cfg.merge_from_file(os.path.join(output_dir, "config.yaml"))
    logged = last_logged(os.path.join(output_dir, "metrics.json"), ("loss_supcon", "total_loss") + DIAGNOSTICS)
    if tuple(cfg.MODEL.LOSSES.NAME) == ("SupConLoss",) and "total_loss" in logged:
        logged["loss_supcon"] = logged["total_loss"]        # FastReID logs a lone loss as the total only
    report = {k: value for k, (value, _) in logged.items() if k != "total_loss"}
    if "loss_supcon" not in report:
        return report, ""
    chance, floor = supcon_levels(cfg)
    report.update(iteration=logged["loss_supcon"][1], supcon_chance=chance, supcon_floor=floor,
                  supcon_over_chance=report["loss_supcon"] / chance,
                  top1_chance=cfg.DATALOADER.NUM_INSTANCE / cfg.SOLVER.IMS_PER_BATCH)
    line = (f"loss_supcon {report['loss_supcon']:.2f} = {report['supcon_over_chance']:.2f} x chance "
            f"(chance {chance:.2f}, floor {floor:.2f}); in-batch top-1 image->prompt "
            f"{report['align_i2t_top1']:.2f}, prompt->image {report['align_t2i_top1']:.2f} "
            f"(chance {report['top1_chance']:.2f}); mean pairwise cosine of v {report['collapse_v_cos']:.2f}, "
            f"of l_p {report['collapse_text_cos']:.2f}; |s*| / |word embedding| {report['pseudo_token_norm_ratio']:.1f}")
    return report, line
