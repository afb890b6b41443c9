#!/usr/bin/env python
"""Ranked lists and the ROC curve of a trained model on a test set, drawn by FastReID's Visualizer.

    python tools/visualize_result.py --config-file projects/PromptSG/configs/Market1501/vit.yml \\
        --output vis/market1501 MODEL.WEIGHTS logs/market1501/promptsg_vit/model_final.pth
    python tools/visualize_result.py --config-file CFG --output DIR --num-vis 20 --max-rank 10 \\
        --rank-sort descending --vis-label MODEL.WEIGHTS model.pth TEST.RERANK.ENABLED True

Works for every model tools/train_net.py trains (PromptSG, the CLIP baseline, FastReID's own
baselines). The test set is evaluated exactly as ``train_net.py --eval-only`` evaluates it
(FastReID's ReidEvaluator, with the config's flip test, AQE, metric and re-ranking); the distance
matrix that evaluation ranks is the one drawn. Writes to --output:

  * ``0.jpg`` ... : one ranked list per query, ``--num-vis`` queries ordered by their AP
    (``--rank-sort ascending``: the worst first); a green frame marks a correct match, a red one a
    wrong one, each gallery image labelled with its distance in as many significant digits as it
    takes to tell the list's distances apart (a model whose distances all lie below 1e-4 still
    reads; FastReID's labels print 1 - distance to 3 decimals, all "1.000" then);
  * ``roc.jpg``, ``roc_info.pickle``: the ROC curve of query-gallery pairs (FastReID's);
  * ``pos_neg_dist.jpg``: the distance distributions of positive and negative pairs, on shared
    bins ranged to the data (FastReID's fixed 0-1.4 axis put every distance of such a model in
    one bin);
  * ``rank_lists.json``: for each drawn query its image, AP and top ``--max-rank`` gallery images
    with rank, distance and match flag (the same-camera images of its own identity left out, as
    in the evaluation), and with ``--vis-label`` its true matches; ``results.json``: the evaluation's metrics.

The lists and figures are drawn by ``promptsg.analysis.visualize``.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

import promptsg  # noqa: E402,F401  (patches FastReID, registers PromptSG)

from fastreid.utils.visualizer import Visualizer  # noqa: E402
from promptsg.analysis.visualize import (evaluate_and_capture, plot_distance_histogram, plot_rank_list,  # noqa: E402
                                         rank_lists)
from promptsg.engine.checkpoint import NonFiniteError, load_for_inference  # noqa: E402
from promptsg.engine.preflight import InputError, check_datasets, load_checkpoint_config  # noqa: E402
from promptsg.engine.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the figures")
    parser.add_argument("--dataset", default=None, help="test set name (default: the first of DATASETS.TESTS)")
    parser.add_argument("--num-vis", type=int, default=100, help="number of queries to draw")
    parser.add_argument("--max-rank", type=int, default=10, help="gallery images per ranked list")
    parser.add_argument("--rank-sort", default="ascending", choices=("ascending", "descending"),
                        help="draw the queries by AP: ascending = worst first")
    parser.add_argument("--label-sort", default="ascending", choices=("ascending", "descending"),
                        help="with --vis-label: the query's true matches by rank, ascending = the "
                             "worst-ranked first")
    parser.add_argument("--vis-label", action="store_true", help="add a row with the query's true matches")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num_vis < 1 or args.max_rank < 1:
        parser.error("--num-vis and --max-rank must be >= 1")
    return args


def setup(args):
    """The config, checked like train_net.py --eval-only checks it (one line per bad input)."""
    cfg = load_checkpoint_config(args.config_file, args.opts)
    dataset = args.dataset or (cfg.DATASETS.TESTS[0] if cfg.DATASETS.TESTS else None)
    if dataset is None:
        raise InputError(f"{args.config_file}: DATASETS.TESTS is empty; name a test set with --dataset")
    test_only = cfg.clone()
    test_only.DATASETS.NAMES, test_only.DATASETS.TESTS = (), (dataset,)   # no training data needed
    check_datasets(test_only, os.getenv("FASTREID_DATASETS", "datasets"))
    cfg.freeze()
    return cfg, dataset


def main(argv=None):
    args = parse_args(argv)
    cfg, dataset_name = setup(args)
    os.makedirs(args.output, exist_ok=True)
    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    results, dataset, ranked = evaluate_and_capture(cfg, model, dataset_name)

    visualizer = Visualizer(dataset)
    visualizer.get_model_output(ranked["all_ap"], ranked["dist"], ranked["q_pids"], ranked["g_pids"],
                                ranked["q_camids"], ranked["g_camids"])
    num_vis = min(args.num_vis, visualizer.num_query)
    fpr, tpr, pos, neg = visualizer.vis_roc_curve(args.output)
    visualizer.save_roc_info(args.output, fpr, tpr, pos, neg)
    plt.close("all")
    plot_distance_histogram(pos, neg, os.path.join(args.output, "pos_neg_dist.jpg"))

    query_indices = np.argsort(visualizer.all_ap, kind="stable")
    if args.rank_sort == "descending":
        query_indices = query_indices[::-1]
    lists = rank_lists(visualizer, dataset, query_indices[:num_vis], args.max_rank,
                       args.label_sort if args.vis_label else None)
    for i, query in enumerate(tqdm(lists, desc="ranked lists", disable=None)):
        plot_rank_list(query, os.path.join(args.output, f"{i}.jpg"))
    with open(os.path.join(args.output, "rank_lists.json"), "w") as f:
        json.dump(lists, f, indent=1)
    metrics = {k: float(v) for k, v in results.items()}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"{dataset_name}: mAP {metrics['mAP']:.2f}, Rank-1 {metrics['Rank-1']:.2f}; "
          f"{num_vis} ranked lists, roc.jpg and pos_neg_dist.jpg in {args.output}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
