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
    (``--rank-sort ascending``: the worst first); a red frame marks a correct match;
  * ``roc.jpg``, ``pos_neg_dist.jpg``, ``roc_info.pickle``: the ROC curve of query-gallery pairs
    and the distance distributions of positive and negative pairs;
  * ``rank_lists.json``: for each drawn query its image, AP and top ``--max-rank`` gallery images
    with distance and match flag (the same-camera images of its own identity left out, as in
    the evaluation); ``results.json``: the evaluation's metrics.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402

import promptsg  # noqa: E402,F401  (patches FastReID, registers PromptSG)
from fastreid.engine import DefaultTrainer  # noqa: E402
from fastreid.evaluation import inference_on_dataset  # noqa: E402
from promptsg.checkpoint import NonFiniteError, load_for_inference  # noqa: E402
from fastreid.utils.visualizer import Visualizer  # noqa: E402
from promptsg.evaluation import ranked_distances  # noqa: E402
from promptsg.preflight import InputError, check_datasets, load_checkpoint_config  # noqa: E402

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
                        help="with --vis-label: order of the true matches in the second row")
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


def evaluate_and_capture(cfg, model, dataset_name):
    """FastReID's evaluation of ``model``; returns its metrics, the test dataset and what it ranked
    (the distance matrix after the metric, AQE and re-ranking: ``promptsg.evaluation.ranked_distances``)."""
    loader, evaluator = DefaultTrainer.build_evaluator(cfg, dataset_name)
    with ranked_distances() as ranked:
        results = inference_on_dataset(model, loader, evaluator, flip_test=cfg.TEST.FLIP.ENABLED)
    return results, loader.dataset, ranked


def rank_lists(visualizer, dataset, query_indices, max_rank):
    """The ranked lists the figures show, as plain data."""
    lists = []
    for q in query_indices:
        matches, order = visualizer.get_matched_result(q)
        top = [{"image": dataset.img_items[visualizer.num_query + int(g)][0],
                "distance": float(visualizer.dist[q, g]), "match": bool(m)}
               for g, m in zip(order[:max_rank], matches[:max_rank])]
        lists.append({"query": dataset.img_items[q][0], "ap": float(visualizer.all_ap[q]), "top": top})
    return lists


def main(argv=None):
    args = parse_args(argv)
    cfg, dataset_name = setup(args)
    os.makedirs(args.output, exist_ok=True)
    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    results, dataset, ranked = evaluate_and_capture(cfg, model, dataset_name)

    visualizer = Visualizer(dataset)
    visualizer.get_model_output(ranked["all_ap"], ranked["dist"], ranked["q_pids"], ranked["g_pids"],
                                ranked["q_camids"], ranked["g_camids"])
    num_vis = min(args.num_vis, visualizer.num_query)
    visualizer.vis_rank_list(args.output, args.vis_label, num_vis, args.rank_sort, args.label_sort,
                             args.max_rank)
    fpr, tpr, pos, neg = visualizer.vis_roc_curve(args.output)
    visualizer.save_roc_info(args.output, fpr, tpr, pos, neg)
    visualizer.plot_distribution(pos, neg)
    matplotlib.pyplot.savefig(os.path.join(args.output, "pos_neg_dist.jpg"))

    query_indices = np.argsort(visualizer.all_ap)
    if args.rank_sort == "descending":
        query_indices = query_indices[::-1]
    lists = rank_lists(visualizer, dataset, query_indices[:num_vis], args.max_rank)
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
