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
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import promptsg  # noqa: E402,F401  (patches FastReID, registers PromptSG)
from fastreid.engine import DefaultTrainer  # noqa: E402
from fastreid.evaluation import inference_on_dataset  # noqa: E402
from promptsg.engine.checkpoint import NonFiniteError, load_for_inference  # noqa: E402
from fastreid.utils.visualizer import Visualizer  # noqa: E402
from promptsg.engine.evaluation import ranked_distances  # noqa: E402
from promptsg.engine.compat import image_to_rgb  # noqa: E402
from promptsg.engine.preflight import InputError, check_datasets, load_checkpoint_config  # noqa: E402

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


def evaluate_and_capture(cfg, model, dataset_name):
    """FastReID's evaluation of ``model``; returns its metrics, the test dataset and what it ranked
    (the distance matrix after the metric, AQE and re-ranking: ``promptsg.engine.evaluation.ranked_distances``)."""
    loader, evaluator = DefaultTrainer.build_evaluator(cfg, dataset_name)
    with ranked_distances() as ranked:
        results = inference_on_dataset(model, loader, evaluator, flip_test=cfg.TEST.FLIP.ENABLED)
    return results, loader.dataset, ranked


def rank_lists(visualizer, dataset, query_indices, max_rank, label_sort=None):
    """The ranked lists the figures show, as plain data; with ``label_sort`` also each query's true
    matches ("true": rank, image, distance), the worst-ranked first for "ascending"."""
    lists = []
    for q in query_indices:
        matches, order = visualizer.get_matched_result(q)

        def entry(rank):
            g = int(order[rank])
            return {"rank": rank + 1, "image": dataset.img_items[visualizer.num_query + g][0],
                    "distance": float(visualizer.dist[q, g]), "match": bool(matches[rank])}

        item = {"query": dataset.img_items[q][0], "ap": float(visualizer.all_ap[q]),
                "top": [entry(r) for r in range(min(max_rank, len(order)))]}
        if label_sort:
            true_ranks = np.flatnonzero(matches)
            if label_sort == "ascending":
                true_ranks = true_ranks[::-1]
            item["true"] = [entry(int(r)) for r in true_ranks[:max_rank]]
        lists.append(item)
    return lists


def distance_labels(distances, min_digits=3, max_digits=9):
    """The distances as text, with the fewest significant digits (at least ``min_digits``) at
    which distinct values read differently."""
    values = [float(d) for d in distances]
    for digits in range(min_digits, max_digits + 1):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(set(values)):
            return labels
    return [f"{v:.{max_digits}g}" for v in values]


def histogram_bins(pos, neg, bins=80):
    """Shared bin edges spanning every positive and negative distance (a tenth of the value's
    magnitude either side when all are equal)."""
    values = np.concatenate([np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)])
    low, high = float(values.min()), float(values.max())
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    return np.linspace(low, high, bins + 1)


def plot_distance_histogram(pos, neg, path):
    edges = histogram_bins(pos, neg)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.hist(pos, bins=edges, alpha=0.7, density=True, color="tab:green", label=f"positive pairs ({len(pos)})")
    ax.hist(neg, bins=edges, alpha=0.5, density=True, color="tab:red", label=f"negative pairs ({len(neg)})")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("query-gallery distance (what the evaluation ranks)")
    ax.set_ylabel("density")
    ax.set_title("Distances of positive and negative pairs")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image_to_rgb(image))


def plot_rank_list(query, path):
    """One ranked list (an entry of rank_lists.json) as a row of images; a second row with the
    query's true matches when the entry has them."""
    rows = [query["top"]] + ([query["true"]] if "true" in query else [])
    columns = 1 + max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 3.6 * len(rows)), squeeze=False)
    axes[0][0].imshow(read_rgb(query["query"]))
    axes[0][0].set_title(f"query\nAP {query['ap']:.3f}", fontsize=9)
    for row, entries in enumerate(rows):
        labels = distance_labels([g["distance"] for g in entries])
        for ax, g, label in zip(axes[row][1:], entries, labels):
            image = read_rgb(g["image"])
            ax.imshow(image)
            ax.add_patch(plt.Rectangle((0, 0), image.shape[1] - 1, image.shape[0] - 1, fill=False, linewidth=4,
                                       edgecolor="tab:green" if g["match"] else "tab:red"))
            ax.set_title(f"#{g['rank']} d={label}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
