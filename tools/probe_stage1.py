#!/usr/bin/env python
"""CLIP-ReID's stage 1 against chance and against what its frozen features allow.

    python tools/probe_stage1.py --config-file projects/PromptSG/configs/Synthetic/clipreid_small_vit.yml
    python tools/probe_stage1.py --config-file CFG --stage1 OUTPUT_DIR/clip_reid_stage1.pth --json

Reads the config's training set and its stage-1 file (default: OUTPUT_DIR/clip_reid_stage1.pth),
computes every training image's feature through the frozen visual encoder as stage 1 does, and
prints the stage-1 loss (epoch mean, SOLVER.STAGE1.IMS_PER_BATCH a batch) of: the learned
prompts' text features, each identity's mean image feature, and free per-identity vectors
trained with the same loss (``promptsg.analysis.stage1``), beside chance and the floor that
identities repeated within a batch set; and the mean pairwise cosine and norm of the image and
text features. Learned prompts far above the free vectors' loss are held back by the frozen text
tower, not by the image features.
"""
import argparse
import os
import sys

import promptsg  # noqa: F401  (mends FastReID for this stack, registers PromptSG and CLIP-ReID)
from fastreid.config import get_cfg
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.utils.env import seed_all_rng

from promptsg.analysis.stage1 import stage1_reference_points
from promptsg.engine.preflight import InputError, load_config
from promptsg.engine.prompt_stage import STAGE1_FILE, image_features, load_stage1
from promptsg.engine.trainer import Trainer
from promptsg.utils.records import print_figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a CLIP-ReID config")
    parser.add_argument("--stage1", metavar="FILE", help=f"stage-1 file (default: OUTPUT_DIR/{STAGE1_FILE})")
    parser.add_argument("--free-epochs", type=int, default=120, help="epochs of the free vectors")
    parser.add_argument("--free-lr", type=float, default=0.01, help="their Adam learning rate")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.free_epochs < 1 or not args.free_lr > 0:
        parser.error("--free-epochs must be >= 1 and --free-lr > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(promptsg.add_promptsg_config(get_cfg()), args.config_file, args.opts)
        if cfg.MODEL.META_ARCHITECTURE != "CLIPReID":
            raise InputError(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}, "
                             "not CLIPReID")
        path = args.stage1 or os.path.join(cfg.OUTPUT_DIR, STAGE1_FILE)
        if not os.path.isfile(path):
            raise InputError(f"stage-1 file not found: {path} (train the config, or give --stage1 FILE)")
        train = []
        for name in cfg.DATASETS.NAMES:
            train.extend(DATASET_REGISTRY.get(name)(root=os.getenv("FASTREID_DATASETS", "datasets")).train)
        cfg.MODEL.HEADS.NUM_CLASSES = len({pid for _, pid, _ in train})
        cfg.MODEL.BACKBONE.PRETRAIN = False
        cfg.freeze()
        seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)   # a CLIP without weights: the same one each time
        model = Trainer.build_model(cfg)
        load_stage1(model, path)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    model.refresh_identity_text()
    feats, labels = image_features(cfg, model, train)
    result = {"stage1_file": path, **stage1_reference_points(
        feats, labels, model.identity_text, cfg.SOLVER.STAGE1.IMS_PER_BATCH, args.free_epochs, args.free_lr,
        seed=max(cfg.SEED, 0))}
    print_figures(result, args.json)
    return result


if __name__ == "__main__":
    main()
