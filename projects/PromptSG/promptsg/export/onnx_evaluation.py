"""FastReID's evaluation of a model and of its exported ONNX graph, and how alike the two rank."""
import sys

import numpy as np
from tqdm import tqdm


from fastreid.evaluation import inference_on_dataset

from ..engine.evaluation import ranked_distances
from .onnx_export import OnnxFeatures
from ..engine.trainer import Trainer


class WithProgress:
    """A test loader that shows a progress bar while FastReID's ``inference_on_dataset`` runs
    through it (that function reads only its length, its dataset and its batches)."""

    def __init__(self, loader, desc):
        self.loader, self.dataset, self.desc = loader, loader.dataset, desc

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(tqdm(self.loader, desc=self.desc, file=sys.stderr, leave=False))


def evaluate(cfg, graph, sess, dataset):
    """FastReID's evaluation on ``dataset`` of the PyTorch model (its own flip test) and of the
    graph (flip test inside it): {"pytorch": (metrics, ranked), "onnx": (metrics, ranked)},
    ``ranked`` holding the query-gallery distances the evaluator ranked."""
    runs = {}
    for name, model, flip_test in (("pytorch", graph.model, cfg.TEST.FLIP.ENABLED),
                                   ("onnx", OnnxFeatures(sess), False)):
        loader, evaluator = Trainer.build_evaluator(cfg, dataset)
        with ranked_distances() as ranked:
            metrics = inference_on_dataset(model, WithProgress(loader, f"{dataset}, {name}"), evaluator,
                                           flip_test=flip_test)
        runs[name] = (metrics, ranked)
    return runs


def same_rankings(dist_a, dist_b, top=None):
    """How many queries order their ``top`` closest gallery images (all with None) the same in
    both distance matrices (stable argsort)."""
    order_a = np.argsort(dist_a, axis=1, kind="stable")[:, :top]
    order_b = np.argsort(dist_b, axis=1, kind="stable")[:, :top]
    return int((order_a == order_b).all(axis=1).sum())
