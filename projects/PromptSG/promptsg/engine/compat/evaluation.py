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
