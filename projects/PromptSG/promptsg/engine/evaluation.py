"""Reading FastReID's evaluation: its chance level, and the distances its ReidEvaluator ranks."""
import contextlib
import importlib

import numpy as np


def chance_level(q_pids, q_camids, g_pids, g_camids):
    """Expected (mAP, Rank-1), as fractions, of a random ranking under the Market-1501 protocol.

    For a query with m valid matches among N valid gallery images (gallery images of the
    query's identity from the query's camera removed), a uniformly random ranking gives
    E[AP] = (H_N + (m - 1) / (N - 1) * (N - H_N)) / N  (H_N the N-th harmonic number) and
    P(rank-1 is a match) = m / N. Queries with no valid match are skipped, as FastReID does.
    """
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    aps, top1 = [], []
    for pid, cam in zip(q_pids, q_camids):
        valid = ~((g_pids == pid) & (g_camids == cam))
        n, m = int(valid.sum()), int(((g_pids == pid) & valid).sum())
        if m == 0:
            continue
        harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
        aps.append((harmonic + (m - 1) / max(n - 1, 1) * (n - harmonic)) / n)
        top1.append(m / n)
    return float(np.mean(aps)), float(np.mean(top1))


@contextlib.contextmanager
def ranked_distances(rank=True):
    """Records what FastReID's ``ReidEvaluator.evaluate`` ranks while the block runs.

    The evaluator builds the query-gallery distance matrix (TEST.METRIC, then TEST.AQE and
    TEST.RERANK when enabled) and passes it with the labels to
    ``fastreid.evaluation.rank.evaluate_rank``; a stand-in for that function records them in the
    dict this yields (``dist``, ``q_pids``, ``g_pids``, ``q_camids``, ``g_camids``, and ``all_ap``
    when ranked). ``rank=False`` skips the ranking itself, for images without identity labels; the
    evaluator's metrics are then zeros.
    """
    module = importlib.import_module("fastreid.evaluation.rank")
    fastreid_evaluate_rank = module.evaluate_rank
    ranked = {}

    def evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, *args, **kwargs):
        ranked.update(dist=np.asarray(dist), q_pids=q_pids, g_pids=g_pids, q_camids=q_camids,
                      g_camids=g_camids)
        if not rank:
            return np.zeros(10), np.zeros(len(q_pids)), np.zeros(len(q_pids))
        cmc, all_ap, all_inp = fastreid_evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, *args, **kwargs)
        ranked["all_ap"] = np.asarray(all_ap)
        return cmc, all_ap, all_inp

    module.evaluate_rank = evaluate_rank
    try:
        yield ranked
    finally:
        module.evaluate_rank = fastreid_evaluate_rank
