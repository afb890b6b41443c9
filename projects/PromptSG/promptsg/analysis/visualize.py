"""A test set's ranking drawn: the distances FastReID's evaluation ranks, the ranked lists as data
and as images (a correct match framed green, a wrong one red, each distance in as many digits as
tell the list's distances apart), and the distances of positive and negative pairs on shared bins
ranged to the data (tools/visualize_result.py). The figures are written to files; the tool picks
matplotlib's file-only backend."""
import numpy as np
from matplotlib import pyplot as plt
from PIL import Image


from fastreid.evaluation import inference_on_dataset

from ..engine.compat import image_to_rgb
from ..engine.evaluation import ranked_distances
from ..engine.trainer import Trainer


def evaluate_and_capture(cfg, model, dataset_name):
    """FastReID's evaluation of ``model``; returns its metrics, the test dataset and what it ranked
    (the distance matrix after the metric, AQE and re-ranking: ``promptsg.engine.evaluation.ranked_distances``)."""
    loader, evaluator = Trainer.build_evaluator(cfg, dataset_name)
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
    """The distances of positive and negative pairs as two histograms on shared bins, to ``path``."""
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
    """An image file as an (H, W, 3) RGB array."""
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
