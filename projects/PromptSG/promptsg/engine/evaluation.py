"""FastReID's evaluation, extended and read: ``ChunkedReidEvaluator`` (the evaluator every run,
tool and ``promptsg.load`` uses, returned by ``engine.trainer.Trainer.build_evaluator``) ranks in
bounded memory, refuses non-finite features and counts the queries it scored; ``ranked_distances``
records the distance matrix FastReID's own path ranks; ``chance_level`` is a random ranking's mAP."""
import contextlib
import copy
import importlib
import itertools
import logging
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from fastreid.evaluation.reid_evaluation import ReidEvaluator
from fastreid.utils import comm

from .checkpoint import check_finite_features
from .query_expansion import expand_queries
from .ranking import GalleryDistances, evaluate_in_chunks, query_chunks
from .sparse_rerank import SparseReranker

logger = logging.getLogger(__name__)
_dense_readers = 0     # open ranked_distances() blocks: their callers read the whole matrix
_unranked_blocks = 0   # open rank=False blocks: the labels are not identities, so no query is counted


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
    evaluator's metrics are then zeros, and it neither gathers the labels nor counts or logs scored
    and skipped queries. Inside the block the evaluator takes FastReID's dense path (the caller
    wants the whole matrix), not the query chunks of ``evaluate_in_query_chunks``.
    """
    global _dense_readers, _unranked_blocks
    _dense_readers += 1
    _unranked_blocks += not rank
    try:
        with recorded_ranking(rank) as ranked:
            yield ranked
    finally:
        _dense_readers -= 1
        _unranked_blocks -= not rank


@contextlib.contextmanager
def recorded_ranking(rank=True):
    """``ranked_distances`` without asking for the dense path: records the matrix when FastReID's
    ``evaluate_rank`` runs, for as long as the block runs."""
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


def record_query_counts(results, total, evaluated):
    """``queries_evaluated`` and ``queries_skipped`` in the evaluator's results, and a log line
    (a warning when the protocol skipped queries)."""
    results["queries_evaluated"], results["queries_skipped"] = evaluated, total - evaluated
    logger.log(logging.WARNING if evaluated < total else logging.INFO,
               "evaluated %d of %d queries%s", evaluated, total,
               f"; {total - evaluated} skipped: no gallery image of their identity from another camera"
               if evaluated < total else "")


def scorable_queries(q_pids, q_camids, g_pids, g_camids):
    """How many queries the Market-1501 protocol scores: those with a gallery image of their
    identity from another camera (FastReID's ranker skips the others and averages over the rest)."""
    cameras = {}
    for pid, camid in zip(np.asarray(g_pids).tolist(), np.asarray(g_camids).tolist()):
        cameras.setdefault(pid, set()).add(camid)
    return sum(bool(cameras.get(pid, set()) - {camid})
               for pid, camid in zip(np.asarray(q_pids).tolist(), np.asarray(q_camids).tolist()))


class ChunkedReidEvaluator(ReidEvaluator):
    """FastReID's ``ReidEvaluator`` with three changes to ``evaluate``, each a silent fault or a
    limit of FastReID's:

    * non-finite features stop the evaluation in one line (FastReID ranks NaN features at random
      and prints a mAP; ``checkpoint.check_finite_features``);
    * the results hold ``queries_evaluated`` and ``queries_skipped``, and the log says how many
      queries the protocol skipped (FastReID averages over the rest without a word);
    * with TEST.QUERY_CHUNK > 0 the ranking runs in query chunks (``evaluate_in_query_chunks``): the
      whole query x gallery matrix and its argsort (12 GB at MSMT17's size), re-ranking's three
      dense N x N matrices (105 GB) and AQE's (35 GB) are never held. TEST.QUERY_CHUNK 0, TEST.ROC
      and a ``ranked_distances`` block take FastReID's own dense path.
    """

    def evaluate(self):
        if self._predictions:
            check_finite_features(torch.cat([p["feats"] for p in self._predictions]), "test features")
        if uses_query_chunks(self.cfg):
            return evaluate_in_query_chunks(self)
        counted = not _unranked_blocks      # the same on every process: the gather stays collective
        predictions = self._predictions
        if counted and comm.get_world_size() > 1:   # the labels, gathered as FastReID gathers the predictions
            predictions = list(itertools.chain(*comm.gather(
                [{k: p[k] for k in ("pids", "camids")} for p in predictions], dst=0)))
        results = super().evaluate()
        if counted and comm.is_main_process() and results:
            pids = torch.cat([p["pids"] for p in predictions]).numpy()
            camids = torch.cat([p["camids"] for p in predictions]).numpy()
            n = self._num_query
            record_query_counts(results, n, scorable_queries(pids[:n], camids[:n], pids[n:], camids[n:]))
            self._results.update(results)
        return results


def uses_query_chunks(cfg):
    """Whether ``evaluate_in_query_chunks`` ranks, rather than FastReID's dense path: not when
    TEST.QUERY_CHUNK is 0, TEST.ROC needs every score, or a ``ranked_distances`` block reads the
    whole matrix."""
    return cfg.TEST.get("QUERY_CHUNK", 0) > 0 and not cfg.TEST.ROC.ENABLED and _dense_readers == 0


@torch.no_grad()
def evaluate_in_query_chunks(evaluator):
    """``ReidEvaluator.evaluate`` with its ranking path in bounded memory; the same results.

    The predictions are gathered as FastReID gathers them and TEST.AQE expands them in row chunks
    (``query_expansion.expand_queries``). Then, for each chunk of
    TEST.QUERY_CHUNK queries: the TEST.METRIC distances to the gallery (on the GPU when there is
    one), TEST.RERANK's Jaccard distances from ``SparseReranker`` mixed in by LAMBDA as FastReID
    mixes them, and the chunk's AP, CMC and INP (``ranking.RankAccumulator``). Peak memory grows
    with a chunk times the gallery, not with queries times gallery.
    """
    cfg = evaluator.cfg
    predictions = evaluator._predictions
    if comm.get_world_size() > 1:
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
        if not comm.is_main_process():
            return {}
    features = torch.cat([p["feats"] for p in predictions])
    pids = torch.cat([p["pids"] for p in predictions]).numpy()
    camids = torch.cat([p["camids"] for p in predictions]).numpy()
    num_query = evaluator._num_query
    query, gallery = features[:num_query], features[num_query:]

    if cfg.TEST.AQE.ENABLED:
        logger.info("Test with AQE setting (in row chunks)")
        query, gallery = expand_queries(query, gallery, cfg.TEST.AQE.QE_TIME, cfg.TEST.AQE.QE_K,
                                        cfg.TEST.AQE.ALPHA, cfg.TEST.QUERY_CHUNK)

    reranker = None
    if cfg.TEST.RERANK.ENABLED:
        logger.info("Test with rerank setting (sparse k-reciprocal weights)")
        normalised = cfg.TEST.METRIC == "cosine"
        reranker = SparseReranker(F.normalize(query, dim=1) if normalised else query,
                                  F.normalize(gallery, dim=1) if normalised else gallery,
                                  cfg.TEST.RERANK.K1, cfg.TEST.RERANK.K2)
    lam = cfg.TEST.RERANK.LAMBDA
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to_gallery = GalleryDistances(gallery, cfg.TEST.METRIC, device)

    def distance_chunks():
        for rows in query_chunks(num_query, cfg.TEST.QUERY_CHUNK):
            dist = to_gallery(query[rows])
            if reranker is not None:
                jaccard = torch.from_numpy(reranker.distances(rows)).to(device)
                dist = jaccard * (1 - lam) + dist * lam
            yield rows, dist

    cmc, all_ap, all_inp, _ = evaluate_in_chunks(distance_chunks(), pids[:num_query], camids[:num_query],
                                                 pids[num_query:], camids[num_query:])
    results = OrderedDict()
    mean_ap, mean_inp = np.mean(all_ap), np.mean(all_inp)
    for r in (1, 5, 10):
        results[f"Rank-{r}"] = cmc[r - 1] * 100
    results["mAP"] = mean_ap * 100
    results["mINP"] = mean_inp * 100
    results["metric"] = (mean_ap + cmc[0]) / 2 * 100
    record_query_counts(results, num_query, len(all_ap))
    evaluator._results = results
    return copy.deepcopy(results)
