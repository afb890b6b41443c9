"""Average query expansion (TEST.AQE) in row chunks: FastReID's expansion without its N x N matrix.

FastReID's ``aqe`` replaces every feature, query and gallery alike, by the mean of its ``qe_k``
most similar features (itself included) weighted by cosine similarity ** alpha, ``qe_times``
over; it builds the whole (queries + gallery)^2 similarity matrix for it, 35 GB at MSMT17's
size, and selects the neighbours one row at a time in Python. Here the similarities are built
``chunk`` rows at a time and the neighbours of a chunk taken with one ``topk``: the same
neighbours (up to exactly equal similarities at the k-th place) and the same weighted mean, to
float rounding (tests/test_ranking.py compares both).
"""
import torch
import torch.nn.functional as F

from .ranking import query_chunks


@torch.no_grad()
def expand_queries(query, gallery, qe_times=1, qe_k=10, alpha=3.0, chunk=256):
    """(query, gallery) features -> the expanded (query, gallery), as FastReID's ``aqe``."""
    features = torch.cat([query, gallery]).float()
    if not 1 <= qe_k <= len(features):
        raise ValueError(f"TEST.AQE.QE_K {qe_k}: expected 1 to {len(features)}, the number of test images")
    for _ in range(qe_times):
        unit = F.normalize(features, p=2, dim=1)
        expanded = torch.empty_like(features)
        for rows in query_chunks(len(features), chunk):
            similarity, neighbours = torch.mm(unit[rows], unit.t()).topk(qe_k, dim=1)   # (c, k)
            weights = similarity.pow(alpha).unsqueeze(2)                               # (c, k, 1)
            expanded[rows] = (features[neighbours] * weights).mean(1)
        features = expanded
    return features[:len(query)], features[len(query):]
