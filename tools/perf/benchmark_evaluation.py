"""Time and peak memory of the ReID evaluation at a given split size: one JSON line.

    python tools/perf/benchmark_evaluation.py --queries 11659 --gallery 82161 --dim 512 [--rerank] [--aqe] [--fastreid]

Features are drawn per identity (a centre plus noise, seeded), the labels spread over --ids
identities and --cameras cameras, and FastReID's ``ReidEvaluator`` evaluates them: with the
project's bounded-memory path (TEST.QUERY_CHUNK), and with ``--fastreid`` FastReID's dense path
(TEST.QUERY_CHUNK 0) on the same features, unless its estimated peak exceeds the memory the
machine has free (then ``fastreid`` says so). Each path runs in its own process, so that its peak
resident memory (``peak_rss_gb``) is its own; ``above_features_gb`` is that peak less the
process's memory once the features are built. Seconds cover ``evaluate()`` only.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_gb():
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb / 2 ** 20


def available_gb():
    with open("/proc/meminfo") as meminfo:
        kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return kb / 2 ** 20


def dense_estimate_gb(args):
    """FastReID's dense path: the distances (float32) and their argsort (int64), plus three
    N x N float32 matrices of re-ranking and one of AQE (N = queries + gallery)."""
    n = args.queries + args.gallery
    return (args.queries * args.gallery * 12 + (3 * n * n * 4 if args.rerank else 0)
            + (n * n * 4 if args.aqe else 0)) / 2 ** 30


def run_path(args, chunk):
    """Evaluate in this process; returns the measured dict."""
    import numpy as np
    import torch

    import promptsg  # noqa: F401  (FastReID's patches)
    from fastreid.config import get_cfg
    from promptsg import add_promptsg_config
    from promptsg.engine.evaluation import ChunkedReidEvaluator

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n = args.queries + args.gallery
    pids = rng.integers(0, args.ids, n)
    centres = rng.standard_normal((args.ids, args.dim), dtype=np.float32)
    features = centres[pids]
    features += args.noise * rng.standard_normal((n, args.dim), dtype=np.float32)
    cfg = add_promptsg_config(get_cfg())
    cfg.defrost()
    cfg.TEST.QUERY_CHUNK = chunk
    cfg.TEST.RERANK.ENABLED = args.rerank
    cfg.TEST.AQE.ENABLED = args.aqe
    evaluator = ChunkedReidEvaluator(cfg, num_query=args.queries)
    evaluator.process({"targets": torch.from_numpy(pids), "camids": torch.from_numpy(rng.integers(0, args.cameras, n))},
                      torch.from_numpy(features))
    del features, centres
    before = rss_gb()
    start = time.perf_counter()
    results = evaluator.evaluate()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 2), "above_features_gb": round(peak - before, 2),
            "mAP": round(float(results["mAP"]), 4), "Rank-1": round(float(results["Rank-1"]), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, required=True)
    parser.add_argument("--gallery", type=int, required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rerank", action="store_true", help="TEST.RERANK.ENABLED (k1 20, k2 6, lambda 0.3)")
    parser.add_argument("--aqe", action="store_true", help="TEST.AQE.ENABLED (QE_TIME 1, QE_K 5, ALPHA 3)")
    parser.add_argument("--fastreid", action="store_true", help="also FastReID's dense path on the same features")
    parser.add_argument("--chunk", type=int, default=256, help="TEST.QUERY_CHUNK of the bounded path")
    parser.add_argument("--ids", type=int, default=3060, help="identities (MSMT17's test set: 3,060)")
    parser.add_argument("--cameras", type=int, default=15)
    parser.add_argument("--noise", type=float, default=2.0, help="feature noise around each identity's centre")
    parser.add_argument("--threads", type=int, default=torch_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path-chunk", type=int, default=None, help=argparse.SUPPRESS)   # a worker process
    args = parser.parse_args()
    if args.path_chunk is not None:
        print(json.dumps(run_path(args, args.path_chunk)))
        return

    def worker(chunk):
        command = [sys.executable, __file__, *sys.argv[1:], "--path-chunk", str(chunk)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        return json.loads(done.stdout.strip().splitlines()[-1])

    line = {"queries": args.queries, "gallery": args.gallery, "dim": args.dim, "rerank": args.rerank,
            "aqe": args.aqe, "ids": args.ids, "cameras": args.cameras, "noise": args.noise, "seed": args.seed,
            "threads": args.threads, "chunk": args.chunk, "bounded": worker(args.chunk)}
    if args.fastreid:
        need, have = dense_estimate_gb(args), available_gb()
        line["fastreid"] = worker(0) if need < 0.8 * have else {
            "skipped": f"needs about {need:.1f} GB, {have:.1f} GB available"}
    print(json.dumps(line))


def torch_threads():
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))


if __name__ == "__main__":
    main()
