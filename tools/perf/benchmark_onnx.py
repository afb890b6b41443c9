#!/usr/bin/env python
"""CPU inference speed of a model's exported ONNX graph in onnxruntime against PyTorch, in one run.

    python tools/perf/benchmark_onnx.py --runs logs/synthetic/promptsg_small_vit logs/synthetic/clip_baseline_small_vit
    python tools/perf/benchmark_onnx.py --runs DIR ... --batches 1 32 --threads 2 --rounds 5 --seconds 2 \\
        MODEL.PROMPTSG.INFERENCE_PROMPT composed

Each --runs folder is a training run's OUTPUT_DIR (``config.yaml`` and ``model_final.pth``, as
tools/train_net.py writes them); the KEY VALUE overrides apply to every run. Each model is
exported and checked exactly as tools/export_onnx.py does it (into a temporary folder), then the
PyTorch model (eval mode, ``torch.inference_mode``, float32) and the graph (onnxruntime's CPU
provider, float32) embed a batch of INPUT.SIZE_TEST images at each --batches size. Both use
--threads intra-op threads (onnxruntime's without spinning, so that its idle threads take no CPU
from PyTorch's turns). After a warm-up, the two alternate over --rounds rounds of about
--seconds each, so that other load on the machine hits both alike; each figure is the median
round's images/s, and the ratio is onnxruntime / PyTorch within this run (the harness:
promptsg.export.onnx_speed).

Prints the date, commit, machine and versions, then one line per model and batch size; with
--out also writes them as JSON lines.
"""
import argparse
import json
import os
import sys
import tempfile

import torch
from tqdm import tqdm

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)

from promptsg.engine.checkpoint import load_for_inference
from promptsg.engine.preflight import InputError
from promptsg.export import onnx_export
from promptsg.export.onnx_speed import check_runs, environment, measure, model_name
from promptsg.engine.trainer import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", metavar="DIR",
                        help="training run folders holding config.yaml and model_final.pth")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of both (default 1: with more, PyTorch's OpenMP threads wait on "
                             "each other at every operation when other work shares the CPUs)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per engine (median)")
    parser.add_argument("--seconds", type=float, default=2.0, help="about how long one timed round runs")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the results as JSON lines")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run: KEY VALUE ...")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.threads < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--batches, --threads and --rounds must be >= 1, --seconds > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    configs = check_runs(args.runs, args.opts)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    results = []
    progress = tqdm(total=len(configs) * len(args.batches) * args.rounds * 2, desc="timed rounds", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        for i, (run, cfg) in enumerate(configs):
            model = Trainer.build_model(cfg)
            load_for_inference(model, cfg.MODEL.WEIGHTS)
            graph = onnx_export.feature_graph(cfg, model)
            path = os.path.join(folder, f"model{i}.onnx")
            difference, cosine, _ = onnx_export.export_checked(cfg, graph, path, check_batch=3)
            sess = onnx_export.session(path, threads=args.threads, spinning=False)
            for batch in args.batches:
                speed = measure(graph, sess, onnx_export.example_images(cfg, batch), args.rounds, args.seconds, progress)
                results.append({**env, "run": run, "model": model_name(cfg), "image_size": list(cfg.INPUT.SIZE_TEST),
                                "batch": batch, "pytorch_images_per_s": round(speed["pytorch"], 1),
                                "onnxruntime_images_per_s": round(speed["onnxruntime"], 1),
                                "ratio": round(speed["onnxruntime"] / speed["pytorch"], 3),
                                "max_abs_difference": difference, "min_cosine": cosine})
    progress.close()

    print(f"{env['date']}, commit {env['commit']}; {env['cpus']}-CPU machine ({env['cpu']}), {args.threads} threads, "
          f"load average {env['load_average']:.1f} at the start; torch {env['torch']}, onnxruntime "
          f"{env['onnxruntime']}, float32; median of {args.rounds} alternating rounds of ~{args.seconds:g} s")
    print(f"{'model':<40} {'size':>8} {'batch':>5} {'PyTorch img/s':>14} {'ONNX Runtime img/s':>19} {'ratio':>6}")
    for r in results:
        size = "x".join(map(str, r["image_size"]))
        print(f"{r['model']:<40} {size:>8} {r['batch']:>5} {r['pytorch_images_per_s']:>14.1f} "
              f"{r['onnxruntime_images_per_s']:>19.1f} {r['ratio']:>5.2f}x")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    try:
        main()
    except (InputError, onnx_export.ExportError) as exc:
        sys.exit(f"error: {exc}")
