"""Evaluation in bounded memory (promptsg/engine/ranking.py, sparse_rerank.py, query_expansion.py, evaluation.py)
against FastReID's own dense path: ``evaluate_rank``, ``build_dist(metric="jaccard")`` and
``ReidEvaluator.evaluate`` with TEST.QUERY_CHUNK 0, on random splits with ties and skipped queries."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptsg  # noqa: F401  (FastReID's patches)
from fastreid.config import get_cfg
from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import build_dist
from promptsg import add_promptsg_config
from promptsg.engine.evaluation import ChunkedReidEvaluator as ReidEvaluator, ranked_distances
from promptsg.engine.query_expansion import expand_queries
from promptsg.engine.ranking import MIN_ROWS, RankAccumulator, evaluate_in_chunks, metric_distances, query_chunks
from promptsg.engine.sparse_rerank import SparseReranker, expanded_sets


def random_split(seed, q=150, g=900, d=16, ids=40, ties=False):
    """Features and labels; some query identities absent from the gallery (skipped queries);
    with ``ties``, coarse features and repeated gallery rows so that distances tie exactly."""
    rng = np.random.default_rng(seed)
    query = torch.from_numpy(rng.standard_normal((q, d)).astype(np.float32))
    gallery = torch.from_numpy(rng.standard_normal((g, d)).astype(np.float32))
    if ties:
        query, gallery = torch.round(query), torch.round(gallery)
        gallery[10:30] = gallery[0]
        query[:8] = gallery[0]
    labels = dict(q_pids=rng.integers(0, ids + 8, q), g_pids=rng.integers(0, ids, g),
                  q_camids=rng.integers(0, 4, q), g_camids=rng.integers(0, 4, g))
    return query, gallery, labels


def test_query_chunks_cover_the_queries_with_no_short_chunk():
    assert query_chunks(1000, 300) == [slice(0, 300), slice(300, 600), slice(600, 1000)]
    assert query_chunks(50, 300) == [slice(0, 50)]
    assert query_chunks(600, 300) == [slice(0, 300), slice(300, 600)]                 # a full last chunk stays whole
    assert query_chunks(4 * MIN_ROWS, MIN_ROWS) == [slice(i * MIN_ROWS, (i + 1) * MIN_ROWS) for i in range(4)]
    assert query_chunks(200, 8) == [slice(0, MIN_ROWS), slice(MIN_ROWS, 2 * MIN_ROWS), slice(2 * MIN_ROWS, 200)]
    for n, c in [(1, 64), (64, 64), (65, 64), (1000, 100), (12345, 256)]:
        chunks = query_chunks(n, c)
        assert chunks[0].start == 0 and chunks[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
        assert all(s.stop - s.start >= min(n, MIN_ROWS) for s in chunks)


def test_one_query_by_hand():
    # gallery: ids [7, 3, 7, 7, 5], cameras [0, 1, 1, 2, 0]; query id 7 camera 0: image 0 is junk
    # (same id, same camera). Distances rank the valid images 2 (match), 1, 3 (match), 4.
    acc = RankAccumulator(g_pids=[7, 3, 7, 7, 5], g_camids=[0, 1, 1, 2, 0], max_rank=5)
    acc.add(torch.tensor([[0.0, 0.3, 0.1, 0.5, 0.9]]), q_pids=[7], q_camids=[0])
    cmc, all_ap, all_inp = acc.result()
    assert all_ap == pytest.approx([(1 / 1 + 2 / 3) / 2])
    assert all_inp == pytest.approx([2 / 3])
    assert cmc.tolist() == [1, 1, 1, 1, 1]                 # the first match is ranked first
    acc.add(torch.tensor([[0.0, 0.3, 0.1, 0.5, 0.9]]), q_pids=[9], q_camids=[0])   # no match: skipped
    assert len(acc.result()[1]) == 1 and acc.num_queries == 2


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_metrics_equal_fastreid(metric, ties):
    query, gallery, labels = random_split(1 + ties, ties=ties)
    dense = build_dist(query, gallery, metric)
    cmc, all_ap, all_inp = evaluate_rank(dense, labels["q_pids"], labels["g_pids"], labels["q_camids"], labels["g_camids"])
    chunks = ((rows, metric_distances(query[rows], gallery, metric)) for rows in query_chunks(len(query), 64))
    cmc2, all_ap2, all_inp2, acc = evaluate_in_chunks(chunks, labels["q_pids"], labels["q_camids"],
                                                      labels["g_pids"], labels["g_camids"])
    assert len(all_ap2) == len(all_ap) < len(query)                     # some queries skipped
    np.testing.assert_allclose(all_ap2, all_ap, atol=1e-6)
    np.testing.assert_allclose(all_inp2, all_inp, atol=1e-6)
    np.testing.assert_array_equal(cmc2, cmc)
    assert (acc.tied_queries > 0) == ties                                # the tie path ran where ties are


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_distance_chunks_are_fastreids_bits(metric):
    query, gallery, _ = random_split(3, q=300, g=700, d=64)
    dense = build_dist(query, gallery, metric)
    for rows in query_chunks(len(query), 64):
        np.testing.assert_array_equal(metric_distances(query[rows], gallery, metric).numpy(), dense[rows])


@pytest.mark.parametrize("k1, k2, duplicates", [(20, 6, False), (10, 3, True), (20, 1, False), (11, 4, False),
                                               (13, 3, True)])
def test_sparse_jaccard_equals_fastreid(k1, k2, duplicates):
    query, gallery, _ = random_split(4, q=60, g=400, d=8)
    if duplicates:
        gallery[50:60] = gallery[5]
    query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    dense = build_dist(query, gallery, metric="jaccard", k1=k1, k2=k2)
    reranker = SparseReranker(query, gallery, k1, k2)
    sparse = np.concatenate([reranker.distances(rows) for rows in query_chunks(len(query), 16)])
    np.testing.assert_allclose(sparse, dense, atol=1e-6)
    assert (dense < 1).mean() > 0.1                          # not a comparison of ones (no overlap)


def test_expanded_sets_by_hand():
    # 4 images, k1 = 2: neighbours (self first). 0 <-> 1 and 2 <-> 3 are mutual; 1's list holds 2,
    # but 2's does not hold 1. Half sets (round(2 / 2) = 1, so 2 neighbours) are the same pairs.
    ranks = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])
    sets = [sorted(int(j) for j in row if j >= 0) for row in expanded_sets(ranks, 2)]
    assert sets == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("qe_times,qe_k,alpha", [(1, 10, 3.0), (2, 5, 1.0)])
def test_query_expansion_in_chunks_equals_fastreid(qe_times, qe_k, alpha):
    from fastreid.evaluation.query_expansion import aqe

    query, gallery, _ = random_split(8, q=150, g=500, d=32)
    want = aqe(query, gallery, qe_times, qe_k, alpha)
    got = expand_queries(query, gallery, qe_times, qe_k, alpha, chunk=64)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b.float(), rtol=0, atol=1e-6)
    # by hand: one feature's expansion is the alpha-weighted mean of its k most similar (itself first)
    unit = F.normalize(torch.cat([query, gallery]), dim=1)
    sims = unit[0] @ unit.t()
    top = torch.argsort(sims, descending=True)[:qe_k]
    assert top[0] == 0
    if qe_times == 1:
        expected = (torch.cat([query, gallery])[top] * sims[top, None] ** alpha).mean(0)
        torch.testing.assert_close(got[0][0], expected, rtol=0, atol=1e-6)


def test_query_expansion_refuses_more_neighbours_than_images():
    query, gallery, _ = random_split(9, q=10, g=20)
    with pytest.raises(ValueError, match="TEST.AQE.QE_K 31: expected 1 to 30"):
        expand_queries(query, gallery, 1, 31)


def evaluator_results(query, gallery, labels, **test):
    cfg = add_promptsg_config(get_cfg())
    cfg.defrost()
    for key, value in test.items():
        node, name = cfg.TEST, key
        if "." in key:
            head, name = key.split(".")
            node = cfg.TEST[head]
        node[name] = value
    evaluator = ReidEvaluator(cfg, num_query=len(query))
    evaluator.process({"targets": torch.from_numpy(np.concatenate([labels["q_pids"], labels["g_pids"]])),
                       "camids": torch.from_numpy(np.concatenate([labels["q_camids"], labels["g_camids"]]))},
                      torch.cat([query, gallery]))
    return evaluator.evaluate()


@pytest.mark.parametrize("options", [{}, {"METRIC": "euclidean"}, {"AQE.ENABLED": True},
                                     {"RERANK.ENABLED": True}, {"RERANK.ENABLED": True, "RERANK.K1": 10,
                                                                "RERANK.K2": 3, "RERANK.LAMBDA": 0.5}])
def test_evaluator_in_chunks_equals_fastreids_dense_path(options):
    query, gallery, labels = random_split(5, q=200, g=800, d=32, ties=False)
    dense = evaluator_results(query, gallery, labels, QUERY_CHUNK=0, **options)
    chunked = evaluator_results(query, gallery, labels, QUERY_CHUNK=64, **options)
    assert list(chunked) == list(dense)                                  # same keys, same order
    assert chunked["queries_skipped"] == dense["queries_skipped"] > 0
    for key in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP", "metric"):
        assert chunked[key] == pytest.approx(dense[key], abs=1e-6), key    # percent


def test_roc_keeps_fastreid_s_dense_path_and_its_tpr_keys():
    """TEST.ROC needs every score: with QUERY_CHUNK set, the results still hold FastReID's TPR@FPR
    values, equal to the dense path's."""
    query, gallery, labels = random_split(8, q=100, g=300, d=16, ties=False)
    dense = evaluator_results(query, gallery, labels, QUERY_CHUNK=0, **{"ROC.ENABLED": True})
    chunked = evaluator_results(query, gallery, labels, QUERY_CHUNK=64, **{"ROC.ENABLED": True})
    tpr = [key for key in dense if key.startswith("TPR@FPR=")]
    assert tpr == ["TPR@FPR=1e-04", "TPR@FPR=1e-03", "TPR@FPR=1e-02"]
    assert [chunked[key] for key in tpr] == [dense[key] for key in tpr]


def test_ranked_distances_still_reads_the_whole_matrix():
    query, gallery, labels = random_split(6, q=100, g=300)
    with ranked_distances() as ranked:
        results = evaluator_results(query, gallery, labels, QUERY_CHUNK=64)
    assert ranked["dist"].shape == (100, 300)
    np.testing.assert_array_equal(ranked["dist"], build_dist(query, gallery, "cosine"))
    assert results["queries_evaluated"] == len(ranked["all_ap"])


def test_non_finite_features_are_refused_in_one_line():
    query, gallery, labels = random_split(7, q=80, g=200)
    query[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of 280 test features hold NaN or infinity"):
        evaluator_results(query, gallery, labels, QUERY_CHUNK=64)
    acc = RankAccumulator(labels["g_pids"], labels["g_camids"])           # and the ranker itself
    with pytest.raises(ValueError, match="1 of 80 queries have non-finite distances"):
        acc.add(metric_distances(query, gallery, "cosine"), labels["q_pids"], labels["q_camids"])
