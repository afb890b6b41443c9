#!/usr/bin/env python
"""Image-prompt alignment of a PromptSG model on one fixed training batch.

    python tools/probe_alignment.py --config-file projects/PromptSG/configs/Synthetic/promptsg_small_vit.yml \\
        MODEL.WEIGHTS logs/synthetic/promptsg_small_vit/model_final.pth
    python tools/probe_alignment.py --config-file CFG      # no MODEL.WEIGHTS: the pretrained CLIP, new f_theta

Takes the first ``--ids`` training identities with at least ``--per-id`` images, ``--per-id`` images
each (test transforms: no augmentation), runs the model in evaluation mode and prints, for that
batch: L_i2t and L_t2i as the config computes them (with one direction's chance level and floor), the
in-batch top-1 both ways, the collapse monitors (mean pairwise cosine of v, of l_p, and of l_p
within and across identities), the norm of s* against the token embeddings, and how far l_p moves
when s* moves. Prints one JSON object (``--json``) or a table. Without MODEL.WEIGHTS the model is
the config's pretrained CLIP with freshly initialised heads (f_theta's BatchNorm then has no
running statistics: s* is the MLP's output).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.data.build import build_transforms
from fastreid.data.data_utils import read_image
from fastreid.data.datasets import DATASET_REGISTRY

from promptsg.engine.checkpoint import NonFiniteError, load_for_inference
from promptsg.modeling.diagnostics import alignment_diagnostics, mean_pairwise_cosine
from promptsg.engine.preflight import InputError, check_weights, load_config
from promptsg.modeling.supcon import supcon_loss
from promptsg.engine.trainer import Trainer
from promptsg.utils.records import print_figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--ids", type=int, default=16, help="identities in the batch")
    parser.add_argument("--per-id", type=int, default=4, help="images per identity")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.ids < 2 or args.per_id < 1:
        parser.error("--ids must be >= 2 and --per-id >= 1")
    return args


def fixed_batch(cfg, num_ids, per_id):
    """(images (N, 3, H, W) in 0-255, targets (N,)) of the first identities of the training set."""
    root = os.getenv("FASTREID_DATASETS", "datasets")
    dataset = DATASET_REGISTRY.get(cfg.DATASETS.NAMES[0])(root=root)
    by_pid = {}
    for path, pid, _ in dataset.train:
        by_pid.setdefault(pid, []).append(path)
    chosen = [paths[:per_id] for _, paths in sorted(by_pid.items()) if len(paths) >= per_id][:num_ids]
    if len(chosen) < num_ids:
        raise InputError(f"{cfg.DATASETS.NAMES[0]}: only {len(chosen)} training identities have {per_id} images")
    transform = build_transforms(cfg, is_train=False)
    images = torch.stack([transform(read_image(p)) for paths in chosen for p in paths])
    return images, torch.arange(num_ids).repeat_interleave(per_id)


@torch.no_grad()
def probe(model, images, targets):
    """The figures of the module docstring, as a dict of floats."""
    model.eval()
    visual = model.backbone(model.preprocess_image({"images": images}), None, with_tokens=False)
    v = visual.embedding
    sc = model.loss_kwargs["supcon"]
    out = {"batch": len(targets), "identities": int(targets.unique().numel())}
    per_id = len(targets) // out["identities"]
    # One direction's value at chance (uniform similarities) and at its floor (positives only).
    repeat = per_id if sc["positives"] == "sum" else 1
    out["chance"] = repeat * math.log(len(targets))
    out["floor"] = repeat * math.log(per_id)
    out["temperature"] = sc["temperature"]
    out["collapse_v_cos"] = float(mean_pairwise_cosine(v))
    for k, state in enumerate(visual.states[:-1]):          # x_{L-1}, x_L (ViT), the triplet's states
        out[f"collapse_state{k}_cos"] = float(mean_pairwise_cosine(state))
    out["v_norm"] = float(v.norm(dim=1).mean())
    out["v_mean_norm_share"] = float(v.mean(0).norm() / v.norm(dim=1).mean())   # common component
    if model.text is None or model.heads.inversion is None:
        return out
    s_star = model.heads.inversion(v)
    l_p = model.text.compose(s_star)
    token_norm = model.text.token_embedding.weight.norm(dim=1).mean()
    out.update({k: float(x) for k, x in alignment_diagnostics(v, l_p, targets, s_star, token_norm).items()})
    out["L_i2t"] = float(supcon_loss(v, l_p, targets, sc["temperature"], sc["positives"]))
    out["L_t2i"] = float(supcon_loss(l_p, v, targets, sc["temperature"], sc["positives"]))
    same = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool)
    different = targets[:, None] != targets[None, :]
    cos = F.normalize(l_p, dim=1) @ F.normalize(l_p, dim=1).t()
    out["text_cos_same_id"] = float(cos[same].mean())
    out["text_cos_other_id"] = float(cos[different].mean())
    out["pseudo_token_cos"] = float(mean_pairwise_cosine(s_star))
    out["token_norm"] = float(token_norm)
    out["pseudo_token_norm"] = float(s_star.norm(dim=1).mean())
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(promptsg.add_promptsg_config(get_cfg()), args.config_file, args.opts)
        check_weights(cfg, eval_only=False)
        cfg.MODEL.BACKBONE.PRETRAIN = False
        images, targets = fixed_batch(cfg, args.ids, args.per_id)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    cfg.freeze()
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_for_inference(model, cfg.MODEL.WEIGHTS)
    result = probe(model, images, targets)
    print_figures(result, args.json)
    return result


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:   # a foreign or non-finite checkpoint
        sys.exit(f"error: {exc}")
