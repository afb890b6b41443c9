"""Images embedded by FastReID's test path, as the evaluation embeds a test set.

``embed_and_rank`` runs FastReID's test transforms, test loader and ``inference_on_dataset`` (flip
test when TEST.FLIP.ENABLED) and returns the features with the distances FastReID's
``ReidEvaluator`` computes (TEST.METRIC, then TEST.AQE and TEST.RERANK when enabled).
"""
import torch

from fastreid.data.build import build_reid_test_loader
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.evaluation import DatasetEvaluator, inference_on_dataset

from .checkpoint import check_finite_features
from .evaluation import ChunkedReidEvaluator, ranked_distances


class KeptFeatures(DatasetEvaluator):
    """Keeps what ReidEvaluator is given: the model's features, as float32 on the CPU."""

    def __init__(self, ranker=None):
        self.ranker = ranker

    def reset(self):
        self.features = []
        if self.ranker is not None:
            self.ranker.reset()

    def process(self, inputs, outputs):
        self.features.append(outputs.to("cpu", torch.float32))
        if self.ranker is not None:
            self.ranker.process(inputs, outputs)

    def evaluate(self):
        return self.ranker.evaluate() if self.ranker is not None else {}


class BF16Autocast(torch.nn.Module):
    """``model`` run under bf16 autocast; what follows it (the distances) stays float32."""

    def __init__(self, model, device_type):
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(inputs)


def embed_and_rank(cfg, model, query_paths, gallery_paths, camera, bf16=False):
    """(query features, gallery features, query-gallery distances or None), by FastReID's test path;
    ``bf16``: the model runs under bf16 autocast, the features and distances stay float32. Each
    image's target is its position (queries first), which ``WordsQueries`` reads."""
    items = [(path, i, camera) for i, path in enumerate(query_paths + gallery_paths)]
    test_set = CommDataset(items, build_transforms(cfg, is_train=False), relabel=False)
    loader, num_query = build_reid_test_loader(cfg, test_set=test_set, num_query=len(query_paths))
    kept = KeptFeatures(ChunkedReidEvaluator(cfg, num_query) if query_paths else None)
    if bf16:
        model = BF16Autocast(model, torch.device(cfg.MODEL.DEVICE).type)
    with ranked_distances(rank=False) as ranked:
        inference_on_dataset(model, loader, kept, flip_test=cfg.TEST.FLIP.ENABLED)
    features = torch.cat(kept.features)
    check_finite_features(features)
    features = features.numpy()
    return features[:num_query], features[num_query:], ranked.get("dist")
