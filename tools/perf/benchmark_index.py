#!/usr/bin/env python
"""Build time, memory, query latency and recall@10 of the gallery index's faiss configurations.

    python tools/perf/benchmark_index.py --n 1000000 --dim 512 > benchmarks/gallery_index_1M.jsonl
    python tools/perf/benchmark_index.py --n 1000000 --dim 512 --data clustered --configs ivf hnsw ivfpq
    python tools/perf/benchmark_index.py --n 20000 --dim 64 --nlist 256 --configs flat ivf   # small

The gallery is N unit vectors (float32, seeded) and the queries others drawn alike: uniform on
the sphere (the default), or with --data clustered, 20 per identity around identity centres, as
re-identification features cluster (queries are other images of the gallery's identities).
Uniform vectors in 512 dimensions have no neighbourhood structure (a query's nearest neighbour is
barely closer than a random vector), the worst case for IVF and HNSW. Every configuration is
built and searched through ``promptsg.gallery_index.FeatureIndex``, the class a ``GalleryIndex``
searches with (cosine: inner product of normalised rows), each in its own process so that its
peak RSS is its own. Prints one JSON line per configuration and search setting: build time
(training and adding), the index's serialised size, the process's resident memory after making
the data (imports and vectors) and at its peak (before serialising), query latency p50 / p99 at
batch 1 and batch 64, and recall@10 against exact search (faiss.knn, brute force, on the same
queries).

Configurations (--configs): flat ("Flat", exact), ivf ("IVF<nlist>,Flat", nprobe 16 and 64),
hnsw ("HNSW<M>", efSearch 64 and 128), ivfpq ("IVF<nlist>,PQ<m>np", nprobe 16 and 64).

Longer than the tools' 150 lines on purpose: the data, the process per configuration and the
latency and recall measurements are the benchmark itself, used nowhere else, so they stay here.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np


def configs(args):
    """name -> (faiss index_factory string, search settings)."""
    return {"flat": ("Flat", [""]),
            "ivf": (f"IVF{args.nlist},Flat", ["nprobe=16", "nprobe=64"]),
            "hnsw": (f"HNSW{args.hnsw_m}", ["efSearch=64", "efSearch=128"]),
            "ivfpq": (f"IVF{args.nlist},PQ{args.pq_m}np", ["nprobe=16", "nprobe=64"])}


def vectors(args, n, seed, chunk=65536):
    """(n, dim) float32 unit rows, made in chunks (no float64 copy of the whole): uniform on the
    sphere, or (--data clustered) each near one of n / --per-identity identity centres, as a
    re-identification gallery's features are (--spread: the noise's norm against the centre's 1)."""
    rng = np.random.default_rng(seed)
    centres = None
    if args.data == "clustered":
        centres = np.random.default_rng(args.seed + 100).standard_normal(
            (max(args.n // args.per_identity, 1), args.dim), dtype=np.float32)
        faiss.normalize_L2(centres)
    x = np.empty((n, args.dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        x[start:start + rows] = rng.standard_normal((rows, args.dim), dtype=np.float32)
        if centres is not None:
            x[start:start + rows] *= args.spread / np.sqrt(args.dim)
            x[start:start + rows] += centres[rng.integers(0, len(centres), rows)]
    faiss.normalize_L2(x)
    return x


def query_vectors(args):
    """The queries: the first --queries measure recall, all of them latency."""
    return vectors(args, max(args.queries, 64 * args.batches, args.latency_queries), args.seed + 1)


def rss_mb():
    """(current, peak) resident memory of this process in MB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latencies_ms(index, queries, batch, repeats, k):
    times = []
    for i in range(repeats):
        chunk = queries[(i * batch) % len(queries):][:batch]
        start = time.perf_counter()
        index.search(chunk, k)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def worker(args, name, truth_file):
    """Build configuration ``name``, print its JSON lines."""
    from promptsg.gallery_index import FeatureIndex

    faiss.omp_set_num_threads(args.threads)
    if args.blas_threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    factory, settings = configs(args)[name]
    gallery = vectors(args, args.n, args.seed)
    queries = query_vectors(args)
    truth = np.load(truth_file)
    base_rss, _ = rss_mb()
    index = FeatureIndex.create(args.dim, "cosine", factory)
    start = time.perf_counter()
    if not index.index.is_trained:
        index.train(gallery)                         # what add does first, timed apart
    trained = time.perf_counter()
    index.add(gallery)
    built = time.perf_counter()
    del gallery
    lines = []
    for params in settings:
        index.set_params(params)
        _, rows = index.search(queries[:args.queries], args.k)
        found = np.mean([len(set(r) & set(t)) / args.k for r, t in zip(rows, truth)])
        b1 = latencies_ms(index, queries, 1, args.latency_queries, args.k)
        b64 = latencies_ms(index, queries, 64, args.batches, args.k)
        lines.append({"config": name, "factory": factory, "search": params or "exact", "data": args.data,
                      "n": args.n, "dim": args.dim,
                      "train_s": round(trained - start, 2), "add_s": round(built - trained, 2),
                      "build_s": round(built - start, 2), f"recall@{args.k}": round(float(found), 4),
                      "b1_p50_ms": round(b1[0], 3), "b1_p99_ms": round(b1[1], 3),
                      "b64_p50_ms": round(b64[0], 3), "b64_p99_ms": round(b64[1], 3)})
    current, peak = rss_mb()
    size = len(index.serialize()) / 2**20
    for line in lines:
        line.update(index_mb=round(size, 1), base_rss_mb=round(base_rss), peak_rss_mb=round(peak), threads=args.threads,
                    blas_threshold=faiss.cvar.distance_compute_blas_threshold,
                    faiss=faiss.__version__, gpu=index.on_gpu, queries=args.queries,
                    latency_samples={"b1": args.latency_queries, "b64": args.batches})
        print(json.dumps(line), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=["flat", "ivf", "hnsw", "ivfpq"],
                        choices=["flat", "ivf", "hnsw", "ivfpq"])
    parser.add_argument("--nlist", type=int, default=4096, help="IVF lists")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per vector")
    parser.add_argument("--pq-m", type=int, default=64, help="PQ sub-quantizers (bytes per vector)")
    parser.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                        help="gallery and queries: random unit vectors, or clustered by identity")
    parser.add_argument("--per-identity", type=int, default=20, help="--data clustered: vectors per identity")
    parser.add_argument("--spread", type=float, default=0.75,
                        help="--data clustered: noise norm (0.75: cosine 0.8 to the centre, 0.64 between two)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall")
    parser.add_argument("--latency-queries", type=int, default=200, help="timed batch-1 searches")
    parser.add_argument("--batches", type=int, default=20, help="timed batch-64 searches")
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    parser.add_argument("--blas-threshold", type=int, default=None,
                        help="faiss.cvar.distance_compute_blas_threshold: batches of at least this many "
                             "queries go through BLAS in exact search (faiss 1.15's default: 128000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--truth", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args, args.worker, args.truth)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="benchmark-index-") as tmp:
        truth_file = os.path.join(tmp, "truth.npy")
        gallery = vectors(args, args.n, args.seed)
        queries = query_vectors(args)[:args.queries]
        np.save(truth_file, faiss.knn(queries, gallery, args.k, metric=faiss.METRIC_INNER_PRODUCT)[1])
        del gallery
        passed = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                  if key not in ("configs", "worker", "truth") and value is not None]
        for name in args.configs:
            subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--worker", name, "--truth", truth_file],
                           check=True)


if __name__ == "__main__":
    main()
