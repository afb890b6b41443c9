"""FastReID's evaluation: the Cython ranker, re-ranking on the CPU, the evaluator's checks, and its
ranking in query chunks."""
import os
import subprocess
import sys
import warnings

import torch

from .patch import _patch


# --------------------------------------------------------------------------------------------
# 6. ReidEvaluator compiles the Cython ranker inside site-packages and sys.exit(1)s on failure
# --------------------------------------------------------------------------------------------
def build_cython_ranker(quiet=True):
    """Compile FastReID's Cython rank evaluator in place. Returns True on success.

    Runs ``setup.py build_ext --inplace`` with this interpreter (FastReID's Makefile calls
    whatever ``python3`` is on PATH). Never exits the process: on failure FastReID's pure
    Python ranker, which gives the same numbers more slowly, is used.
    """
    import fastreid.evaluation.rank as rank

    if rank.IS_CYTHON_AVAI:
        return True
    from fastreid.evaluation import rank_cylib

    path = os.path.dirname(os.path.abspath(rank_cylib.__file__))
    try:
        result = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=path, capture_output=quiet, text=True, timeout=600,
        )
        ok = result.returncode == 0
    except (OSError, subprocess.SubprocessError) as exc:
        ok, result = False, exc
    if ok:
        try:
            from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy
        except ImportError as exc:
            ok, result = False, exc
    if not ok:
        detail = getattr(result, "stderr", None) or str(result)
        warnings.warn(
            "FastReID's Cython ranker could not be built in {} ({}); using the Python ranker "
            "(same numbers, slower).".format(path, detail.strip().splitlines()[-1] if detail.strip() else "?")
        )
        return False
    rank.evaluate_cy = evaluate_cy
    rank.IS_CYTHON_AVAI = True
    return True


@_patch
def _evaluator_never_exits():
    import fastreid.evaluation.reid_evaluation as reid_evaluation
    import fastreid.evaluation.rank_cylib as rank_cylib

    def compile_helper():
        build_cython_ranker()

    reid_evaluation.compile_helper = compile_helper
    rank_cylib.compile_helper = compile_helper

    try:  # built at set-up time ("make setup"): pick it up even if rank.py was imported first
        import fastreid.evaluation.rank as rank
        from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy

        rank.evaluate_cy, rank.IS_CYTHON_AVAI = evaluate_cy, True
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# 7. Re-ranking calls features.cuda() and faiss GPU resources
# --------------------------------------------------------------------------------------------
@_patch
def _rerank_on_cpu():
    """k-reciprocal re-ranking searches with faiss on the CPU when there is no GPU for faiss."""
    import faiss
    import fastreid.utils.compute_dist as compute_dist

    original = compute_dist.compute_jaccard_distance
    if getattr(original, "_promptsg_patched", False):
        return

    def compute_jaccard_distance(features, k1=20, k2=6, search_option=0, fp16=False):
        if search_option < 3 and not (torch.cuda.is_available() and faiss.get_num_gpus() > 0):
            search_option = 3
        return original(features, k1=k1, k2=k2, search_option=search_option, fp16=fp16)

    compute_jaccard_distance._promptsg_patched = True
    compute_dist.compute_jaccard_distance = compute_jaccard_distance


# --------------------------------------------------------------------------------------------
# SILENT: the evaluator ranks NaN features and reports a metric
# --------------------------------------------------------------------------------------------
@_patch
def _evaluation_refuses_non_finite():
    """``ReidEvaluator.evaluate`` computes distances and a mAP from whatever features it got; NaN
    features rank at random and still print a number. It now stops in one line instead
    (``checkpoint.check_finite_features``, one host read per evaluation)."""
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from ..checkpoint import check_finite_features

    if getattr(ReidEvaluator.evaluate, "_promptsg_patched", False):
        return
    fastreid_evaluate = ReidEvaluator.evaluate

    def evaluate(self):
        if self._predictions:
            check_finite_features(torch.cat([p["feats"] for p in self._predictions]), "test features")
        return fastreid_evaluate(self)

    evaluate._promptsg_patched = True
    ReidEvaluator.evaluate = evaluate


# --------------------------------------------------------------------------------------------
# SILENT: queries the protocol cannot score are dropped from the mean without a word
# --------------------------------------------------------------------------------------------
@_patch
def _evaluation_counts_queries():
    """FastReID's ranker skips a query with no gallery image of its identity from another camera
    and averages over the rest; the results read as if every query counted. The evaluator's
    results now hold ``queries_evaluated`` and ``queries_skipped`` (so do ``results.json`` and
    ``eval_results.json``), and the log says how many were skipped."""
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from ..evaluation import record_query_counts, recorded_ranking

    if getattr(ReidEvaluator.evaluate, "_promptsg_counts", False):
        return
    fastreid_evaluate = ReidEvaluator.evaluate

    def evaluate(self):
        with recorded_ranking() as ranked:
            results = fastreid_evaluate(self)
        if "all_ap" in ranked:    # the process that ranked (the main one)
            record_query_counts(results, len(ranked["q_pids"]), len(ranked["all_ap"]))
        return results

    evaluate._promptsg_patched = evaluate._promptsg_counts = True
    ReidEvaluator.evaluate = evaluate


# --------------------------------------------------------------------------------------------
# Evaluation holds queries x gallery distances and their argsort; re-ranking three N x N matrices
# --------------------------------------------------------------------------------------------
@_patch
def _evaluation_in_query_chunks():
    """``ReidEvaluator.evaluate`` keeps the whole query x gallery distance matrix and its argsort
    (12 GB at MSMT17's 11,659 x 82,161), TEST.RERANK three dense N x N matrices (about 105 GB
    there, N = queries + gallery) and TEST.AQE one (35 GB). It now ranks TEST.QUERY_CHUNK queries
    at a time, with sparse k-reciprocal weights and AQE in row chunks
    (``evaluation.evaluate_in_query_chunks``): FastReID's metrics, the same result keys,
    ``queries_evaluated`` and ``queries_skipped`` included. FastReID's dense path (with the two
    patches above) still runs with TEST.QUERY_CHUNK 0, TEST.ROC, and inside
    ``evaluation.ranked_distances``, whose callers read the whole matrix."""
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from ..checkpoint import check_finite_features
    from ..evaluation import evaluate_in_query_chunks, uses_query_chunks

    if getattr(ReidEvaluator.evaluate, "_promptsg_chunks", False):
        return
    dense_evaluate = ReidEvaluator.evaluate

    def evaluate(self):
        if not uses_query_chunks(self.cfg):
            return dense_evaluate(self)
        if self._predictions:
            check_finite_features(torch.cat([p["feats"] for p in self._predictions]), "test features")
        return evaluate_in_query_chunks(self)

    evaluate._promptsg_patched = evaluate._promptsg_chunks = True
    ReidEvaluator.evaluate = evaluate
