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
round's images/s, and the ratio is onnxruntime / PyTorch within this run.

Prints the date, commit, machine and versions, then one line per model and batch size; with
--out also writes them as JSON lines.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_export_tool():
    spec = importlib.util.spec_from_file_location("export_onnx", os.path.join(ROOT, "tools", "export_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_tool = load_export_tool()
onnx_export = export_tool.onnx_export


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


def check_runs(runs, opts):
    """Each run's config, checked before any model is built (one line per bad input)."""
    configs = []
    for run in runs:
        config_file = os.path.join(run, "config.yaml")
        weights = os.path.join(run, "model_final.pth")
        cfg = export_tool.setup(argparse.Namespace(config_file=config_file, weights=weights, opts=opts,
                                                   camera=None, evaluate=False,
                                                   output=os.path.join(tempfile.gettempdir(), "model.onnx")))[0]
        configs.append((run, cfg))
    return configs


def environment(threads):
    """Date, commit, machine and versions of this measurement."""
    import onnxruntime

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + ("+changes" if dirty else ""), "cpu": cpu, "cpus": os.cpu_count(),
            "threads": threads, "load_average": os.getloadavg()[0], "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def timed(call, batch, seconds):
    """images/s of ``call`` repeated for about ``seconds`` (at least once)."""
    start = time.perf_counter()
    count = 0
    while True:
        call()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return batch * count / elapsed


def measure(graph, sess, images, rounds, seconds, progress):
    """Median images/s of PyTorch and of onnxruntime, alternating which goes first."""
    array = images.numpy()

    def pytorch():
        with torch.inference_mode():
            graph(images)

    def onnxruntime():
        onnx_export.run(sess, array)

    engines = {"pytorch": pytorch, "onnxruntime": onnxruntime}
    for call in engines.values():   # warm-up: first-call allocations, onnxruntime's arena
        call()
        call()
    speeds = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            speeds[name].append(timed(engines[name], len(images), seconds))
            progress.update()
    return {name: statistics.median(values) for name, values in speeds.items()}


def model_name(cfg):
    if cfg.MODEL.META_ARCHITECTURE != "PromptSG":
        return f"{cfg.MODEL.META_ARCHITECTURE} {cfg.MODEL.BACKBONE.NAME}"
    p = cfg.MODEL.PROMPTSG
    if p.MIM.CROSS_LAYERS == 0:
        return f"CLIP baseline {cfg.MODEL.CLIP.NAME}"
    return f"PromptSG {cfg.MODEL.CLIP.NAME}, {p.INFERENCE_PROMPT} prompt"


def main(argv=None):
    args = parse_args(argv)
    configs = check_runs(args.runs, args.opts)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    results = []
    progress = tqdm(total=len(configs) * len(args.batches) * args.rounds * 2, desc="timed rounds", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        for i, (run, cfg) in enumerate(configs):
            model = export_tool.DefaultTrainer.build_model(cfg)
            export_tool.load_for_inference(model, cfg.MODEL.WEIGHTS)
            graph = onnx_export.feature_graph(cfg, model)
            path = os.path.join(folder, f"model{i}.onnx")
            difference, cosine, _ = export_tool.export_checked(cfg, graph, path, check_batch=3)
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
    except (export_tool.InputError, export_tool.ExportError) as exc:
        sys.exit(f"error: {exc}")
