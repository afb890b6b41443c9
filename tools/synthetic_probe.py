#!/usr/bin/env python
"""Training-free difficulty probe for the SyntheticMarket dataset.

Ranks the gallery for every query by the cosine similarity of colour
histograms (8x8x8 RGB bins) and scores the ranking with FastReID's Market-1501
evaluation (same-camera matches ignored, distractors are negatives, junk is
dropped when the files are read), beside the chance level of a random ranking
(``promptsg.engine.evaluation.chance_level``).

A colour histogram should do clearly better than chance but stay far from
solving the dataset: lighting and backgrounds change colours between cameras
and identities share clothing colours.

Usage: ``python tools/synthetic_probe.py [DATASET_DIR]`` (default:
``$FASTREID_DATASETS/SyntheticMarket``, generated with default parameters if
missing).
"""

import argparse
import os
import os.path as osp
import re

import numpy as np
from PIL import Image

_NAME_RE = re.compile(r"^([-\d]+)_c(\d)")

# Central crop (fractions of height / width): the target's torso and legs in a
# typical box, with little background.
CENTRAL_REGION = ((0.15, 0.85), (0.3, 0.7))


def read_split(split_dir):
    """(paths, pids, camids) of a Market-style folder, junk (pid -1) dropped."""
    paths, pids, cams = [], [], []
    for name in sorted(os.listdir(split_dir)):
        match = _NAME_RE.match(name)
        if not name.endswith(".jpg") or match is None:
            continue
        pid, cam = map(int, match.groups())
        if pid == -1:
            continue
        paths.append(osp.join(split_dir, name))
        pids.append(pid)
        cams.append(cam)
    return paths, np.asarray(pids), np.asarray(cams)


def colour_histograms(paths, bins=8, region=None):
    """L2-normalised ``bins**3`` RGB histograms; ``region`` = ((y0, y1), (x0, x1)) fractions."""
    feats = np.zeros((len(paths), bins ** 3), dtype=np.float64)
    for i, path in enumerate(paths):
        img = np.asarray(Image.open(path).convert("RGB"))
        if region is not None:
            (y0, y1), (x0, x1) = region
            h, w = img.shape[:2]
            img = img[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)]
        q = img.reshape(-1, 3).astype(np.int64) * bins // 256
        feats[i] = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def market_eval(q_feats, g_feats, q_pids, q_cams, g_pids, g_cams):
    """mAP, Rank-1 (FastReID's evaluate_rank on cosine distances) and the chance mAP, as fractions."""
    import promptsg  # noqa: F401  (FastReID needs the compatibility patches to import)
    from fastreid.evaluation.rank import evaluate_rank
    from promptsg.engine.evaluation import chance_level

    dist = (1 - q_feats @ g_feats.T).astype(np.float32)
    cmc, all_ap, _ = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    chance_map, _ = chance_level(q_pids, q_cams, g_pids, g_cams)
    return {"mAP": float(np.mean(all_ap)), "rank1": float(cmc[0]), "chance_mAP": chance_map,
            "num_queries": len(all_ap)}


def probe(dataset_dir, region=CENTRAL_REGION):
    """Colour-histogram probe on a generated dataset directory."""
    q_paths, q_pids, q_cams = read_split(osp.join(dataset_dir, "query"))
    g_paths, g_pids, g_cams = read_split(osp.join(dataset_dir, "bounding_box_test"))
    return market_eval(colour_histograms(q_paths, region=region), colour_histograms(g_paths, region=region),
                       q_pids, q_cams, g_pids, g_cams)


def main():
    default_dir = osp.join(os.getenv("FASTREID_DATASETS", "datasets"), "SyntheticMarket")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", nargs="?", default=default_dir)
    args = parser.parse_args()
    if not osp.isdir(args.dataset_dir):
        from promptsg.data import generate_synthetic_market
        generate_synthetic_market(args.dataset_dir)
    for label, region in (("central region", CENTRAL_REGION), ("whole image", None)):
        r = probe(args.dataset_dir, region)
        print(f"{label:15s} mAP {100 * r['mAP']:5.1f}%  Rank-1 {100 * r['rank1']:5.1f}%  "
              f"chance mAP {100 * r['chance_mAP']:4.2f}%  ({r['num_queries']} queries)")


if __name__ == "__main__":
    main()
