#!/usr/bin/env python
"""Trained runs side by side: accuracy, size, cost per image and inference speed, as one table and one plot.

    python tools/compare.py logs/synthetic/promptsg_small_vit logs/synthetic/clip_baseline_small_vit \\
        logs/synthetic/bot_R18 --output logs/synthetic
    python tools/compare.py RUN [RUN ...] --output DIR [--batch-size 32] [--threads 1] [--rounds 20]

Each RUN is an OUTPUT_DIR of tools/train_net.py (PromptSG, the CLIP baseline, FastReID's BoT,
AGW, SBS, ...): ``config.yaml``, ``model_final.pth`` and ``results.json`` (the final evaluation's
mAP, Rank-1/5/10, mINP). An ``--eval-only`` OUTPUT_DIR (``eval_results.json``, the checkpoint its
MODEL.WEIGHTS names) is a run too. A run ``X`` beside an ``X_composed`` folder (tools/run_synthetic.py
evaluates PromptSG there with the composed prompt) gives both rows: its own prompt mode and the
composed one. A relative MODEL.WEIGHTS is resolved from where the run was started (the run folder
less its relative OUTPUT_DIR), so a copied or moved logs/ folder still reads.

The metrics are the runs' own evaluations; nothing is re-evaluated. Each model is built from the
run's config.yaml and loaded through ``promptsg.engine.checkpoint.load_for_inference`` (whole and finite,
the ID classifier left out), as ``train_net.py --eval-only`` does, and measured on this machine:

  * parameters: every parameter of that inference model (PromptSG's frozen text tower included);
  * GFLOPs per image: one image's forward pass at the config's INPUT.SIZE_TEST, counted by
    ``torch.utils.flop_counter.FlopCounterMode``; a multiply-add counts as 2 FLOPs; matrix
    products, convolutions and attention only (normalisation, activations and element-wise ops
    are not counted). The evaluation's flip test (TEST.FLIP.ENABLED) would run it twice;
  * images/s: CPU, float32, eval mode, ``torch.no_grad``, one fixed batch of random images at
    INPUT.SIZE_TEST (``--batch-size``, ``--threads`` torch threads, 1 by default); ``--warmup``
    batches, then ``--rounds`` timed batches per model, the models taking turns batch by batch so
    that a change in the machine's load falls on all of them; the median. The speed relative to
    the first row is the median over the rounds of the ratio within a round. Absolute figures move
    with the load, the ratios much less; one thread by default, since on a loaded machine several
    threads wait on one another, which slows models of many small operators most.

Writes to --output: ``compare.md`` (the table and how it was measured), ``compare.png`` (mAP against
images/s, one labelled point per row) and ``compare.json`` (the same figures). A missing folder,
config.yaml, results file or checkpoint, or a config that does not build, stops the tool with one
line naming it before anything is measured.
"""
import argparse
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer
from promptsg import add_promptsg_config
from promptsg.engine.checkpoint import NonFiniteError, load_for_inference
from promptsg.engine.preflight import InputError, check_torch_file, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
COMPOSED_SUFFIX = "_composed"


class Run(NamedTuple):
    """One row: a run folder, its config (for inference, on the CPU), checkpoint and metrics."""
    directory: str
    cfg: object
    weights: str
    results: dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="OUTPUT_DIRs of tools/train_net.py")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for compare.md, compare.png and compare.json")
    parser.add_argument("--batch-size", type=int, default=32, help="images per timed batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the speed ratios then hold on a shared machine)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per model first")
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per model")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.threads, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch-size, --threads and --rounds must be >= 1, --warmup >= 0")
    return args


# ---- reading the runs ----

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})") from None


def read_results(directory):
    """The metrics of a run folder: results.json (training), else eval_results.json (--eval-only)."""
    for name in ("results.json", "eval_results.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            results = read_json(path)
            missing = [k for k in METRICS if not isinstance(results, dict) or k not in results]
            if missing:
                raise InputError(f"{path} has no {', '.join(missing)} (not written by tools/train_net.py?)")
            return name, {k: float(results[k]) for k in METRICS}
    raise InputError(f"{directory}: no results.json (nor eval_results.json): not a finished run of tools/train_net.py")


def started_from(directory, output_dir):
    """The folder a run was started from: ``directory`` less its relative OUTPUT_DIR, if it ends so."""
    parts = os.path.normpath(output_dir).split(os.sep) if output_dir and not os.path.isabs(output_dir) else []
    here = os.path.normpath(os.path.abspath(directory)).split(os.sep)
    if parts and here[-len(parts):] == parts:
        return os.sep.join(here[:-len(parts)]) or os.sep
    return None


def resolve_weights(directory, cfg):
    """MODEL.WEIGHTS of an --eval-only run; a relative path from the folder the run was started
    from when it is there (a copied logs/ folder reads its own checkpoint), else as given."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise InputError(f"{directory}: eval_results.json but config.yaml has no MODEL.WEIGHTS")
    origin = None if os.path.isabs(weights) else started_from(directory, cfg.OUTPUT_DIR)
    if origin and os.path.isfile(os.path.join(origin, weights)):
        return os.path.join(origin, weights)
    return weights


def read_run(directory):
    """A Run, every file checked (one-line InputError naming it); nothing is built yet."""
    if not os.path.isdir(directory):
        raise InputError(f"run folder not found: {directory}")
    config = os.path.join(directory, "config.yaml")
    if not os.path.isfile(config):
        raise InputError(f"{directory}: no config.yaml (not an OUTPUT_DIR of tools/train_net.py)")
    results_name, results = read_results(directory)
    cfg = load_config(add_promptsg_config(get_cfg()), config, [])
    weights = (os.path.join(directory, "model_final.pth") if results_name == "results.json"
               else resolve_weights(directory, cfg))
    if not os.path.isfile(weights):
        raise InputError(f"{directory}: checkpoint not found: {weights}")
    check_torch_file(weights, "checkpoint")
    # The inference model: on the CPU, eager, no pretrained file (the checkpoint holds every
    # weight), no ID classifier rows (unused at test; load_for_inference leaves it out).
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.HEADS.NUM_CLASSES = 0
    if "CLIP" in cfg.MODEL:
        cfg.MODEL.CLIP.PRETRAINED = ""
        cfg.MODEL.PROMPTSG.COMPILE = ""
    cfg.freeze()
    return Run(directory, cfg, weights, results)


def find_runs(directories):
    """The runs named, each followed by its ``_composed`` evaluation when there is one; each once."""
    runs, seen = [], set()
    for directory in directories:
        composed = directory.rstrip(os.sep) + COMPOSED_SUFFIX
        for d in (directory, composed) if os.path.isdir(composed) else (directory,):
            key = os.path.realpath(d)
            if key not in seen:
                seen.add(key)
                runs.append(read_run(d))
    return runs


def build(run):
    """The run's inference model, loaded; a config that does not build is one line naming it."""
    clip_log = logging.getLogger("promptsg.modeling.clip_weights")
    level = clip_log.level
    clip_log.setLevel(logging.ERROR)   # its warning about random CLIP weights: the checkpoint holds them
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")   # the 0-row classifier
            model = DefaultTrainer.build_model(run.cfg)
    except Exception as exc:  # FastReID's builders fail with KeyError, AssertionError, TypeError...
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{os.path.join(run.directory, 'config.yaml')}: the model does not build "
                         f"({type(exc).__name__}: {message})") from None
    finally:
        clip_log.setLevel(level)
    load_for_inference(model, run.weights)
    return model.eval()


def describe(cfg, model):
    """What the model is: PromptSG and its test prompt, the CLIP baseline, or a FastReID backbone
    with the parts its built modules show (WITH_NL adds no block to a ResNet-18, for one)."""
    if cfg.MODEL.META_ARCHITECTURE == "PromptSG":
        if model.text is None:
            return f"CLIP baseline ({cfg.MODEL.CLIP.NAME})"
        return f"PromptSG ({cfg.MODEL.CLIP.NAME}), {cfg.MODEL.PROMPTSG.INFERENCE_PROMPT} prompt"
    backbone = cfg.MODEL.BACKBONE
    name = re.sub(r"^build_|_backbone$", "", backbone.NAME)
    modules = {type(m).__name__ for m in model.modules()}
    parts = [f"{name} {backbone.DEPTH}".strip()]
    parts += [label for cls, label in (("IBN", "IBN"), ("Non_local", "non-local")) if cls in modules]
    return f"{cfg.MODEL.META_ARCHITECTURE}: {' + '.join(parts)}, {cfg.MODEL.HEADS.POOL_LAYER}"


# ---- measuring ----

def make_inputs(cfg, batch_size):
    """A batch as FastReID's test loader gives it: 0-255 float images at INPUT.SIZE_TEST, camera 0."""
    height, width = cfg.INPUT.SIZE_TEST
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, height, width, generator=generator) * 255
    return {"images": images, "camids": torch.zeros(batch_size, dtype=torch.long)}


def fresh(inputs):
    """A copy of the batch: FastReID's Baseline normalises its input in place."""
    return {k: v.clone() for k, v in inputs.items()}


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# PyTorch's CPU attention kernel, which FlopCounterMode (torch 2.x) has no formula for: counted
# with PyTorch's own formula for the GPU attention kernels (the same two matrix products).
EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
# ATen operator names of matrix products, convolutions and attention (``aten.<name>``).
MATRIX_OPS = re.compile(r"\w*mm|\w*mv|v?dot|matmul|linear|einsum|\w*conv\w*|\w*attention\w*")


class FlopCountError(RuntimeError):
    """The model runs an operator FlopCounterMode has no formula for: its count would be low."""


class _OpsSeen(TorchDispatchMode):
    """The ATen operators a forward pass runs."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def count_flops(model, inputs):
    """FLOPs of ``model(inputs)`` (a multiply-add = 2 FLOPs; FlopCounterMode's convention), once
    its caches are filled (PromptSG embeds the simplified prompt once, at its first call). The
    fused fast path of nn.MultiheadAttention, which FlopCounterMode does not see, is off while
    counting; an operator that looks like a matrix product but has no formula is an error."""
    with torch.no_grad():
        model(fresh(inputs))
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    seen = _OpsSeen()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter, seen:
            model(fresh(inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    uncounted = sorted(str(op) for op in seen.ops
                       if MATRIX_OPS.fullmatch(str(op).split(".")[-1]) and op not in counter.flop_registry)
    if uncounted:
        raise FlopCountError(f"FlopCounterMode has no formula for {', '.join(uncounted)}: the FLOPs would be "
                             f"undercounted")
    return counter.get_total_flops()


def measure_speed(models, inputs, warmup, rounds):
    """Each model's images/s (median over ``rounds`` timed batches, after ``warmup`` untimed ones)
    and its speed relative to the first model (the median over the rounds of the two batch times'
    ratio in the same round). The models take turns batch by batch, the starting one rotating,
    so a change in the machine's load falls on all of them and the paired ratios cancel it."""
    from tqdm import tqdm

    seconds = [[] for _ in models]
    with torch.no_grad():
        for step in tqdm(range(warmup + rounds), desc="timing (batches per model)", file=sys.stderr):
            for turn in range(len(models)):
                i = (step + turn) % len(models)
                batch = fresh(inputs[i])
                start = time.perf_counter()
                models[i](batch)
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    seconds[i].append(elapsed)
    per_second = [len(inputs[i]["images"]) / statistics.median(s) for i, s in enumerate(seconds)]
    relative = [statistics.median((seconds[0][k] / len(inputs[0]["images"])) / (t / len(inputs[i]["images"]))
                                  for k, t in enumerate(s)) for i, s in enumerate(seconds)]
    return per_second, relative


# ---- the machine and the code measured ----

def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = ", no GPU used" + ("" if torch.cuda.is_available() else " (none present)")
    return f"{model}, {os.cpu_count()} CPU cores{gpu}"


def commit():
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (" with local changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- writing ----

def threads(settings):
    return f"{settings['threads']} torch thread{'s' if settings['threads'] != 1 else ''}"


def markdown(rows, settings):
    lines = [
        f"Measured {settings['date']} (UTC), commit {settings['commit']}, {settings['machine']}; "
        f"torch {settings['torch']}, {threads(settings)}.",
        "",
        "| Run | Model | Test input | mAP | Rank-1 | Rank-5 | Rank-10 | mINP | Parameters (M) | GFLOPs / image "
        "| Images/s | Speed / first row |",
        "|:--|:--|:-:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['input']} | {r['mAP']:.1f} | {r['Rank-1']:.1f} | "
                     f"{r['Rank-5']:.1f} | {r['Rank-10']:.1f} | {r['mINP']:.1f} | {r['parameters'] / 1e6:.2f} | "
                     f"{r['flops_per_image'] / 1e9:.3f} | {r['images_per_s']:.0f} | "
                     f"{r['speed_vs_first']:.2f}x |")
    lines += [
        "",
        "Metrics: each run's own final evaluation (results.json, or eval_results.json for an --eval-only "
        "run). Parameters: all of the inference model's (the ID classifier, unused at test, left out; "
        "PromptSG's frozen text tower included). GFLOPs: one image's forward pass at the test input size, "
        "torch.utils.flop_counter.FlopCounterMode, a multiply-add counted as 2 FLOPs, matrix products, "
        "convolutions and attention only. Images/s: CPU, float32, eval mode, torch.no_grad, "
        f"batches of {settings['batch_size']} random images, {threads(settings)}, "
        f"{settings['warmup']} warm-up then {settings['rounds']} timed batches per model, the models taking "
        "turns in one process (median); speed / first row: the median over the rounds of the two models' "
        "ratio in the same round. Absolute figures move with the machine's load, the ratios much less. "
        "Model forward only: no data loading, no flip test.",
    ]
    return "\n".join(lines) + "\n"


def plot_label(row):
    """The run's name, with PromptSG's test prompt when the name does not say it."""
    match = re.search(r"(\w+) prompt$", row["model"])
    return f"{row['run']} ({match.group(0)})" if match and match.group(1) not in row["run"] else row["run"]


def plot(rows, settings, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    speeds, maps = [r["images_per_s"] for r in rows], [r["mAP"] for r in rows]
    ax.scatter(speeds, maps, zorder=2)
    for r in rows:
        ax.annotate(plot_label(r), (r["images_per_s"], r["mAP"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if max(speeds) / min(speeds) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"inference images/s (CPU fp32, batch {settings['batch_size']}, {threads(settings)})")
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"mAP against speed ({settings['date'][:10]}, commit {settings['commit']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    runs = find_runs(args.runs)
    torch.set_num_threads(args.threads)
    models = [build(run) for run in runs]
    os.makedirs(args.output, exist_ok=True)

    flops = []
    for model, run in zip(models, runs):
        try:
            flops.append(count_flops(model, make_inputs(run.cfg, 1)))
        except FlopCountError as exc:
            raise FlopCountError(f"{run.directory}: {exc}") from None
    inputs = [make_inputs(run.cfg, args.batch_size) for run in runs]
    speeds, relative = measure_speed(models, inputs, args.warmup, args.rounds)

    settings = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "commit": commit(), "machine": machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "batch_size": args.batch_size, "warmup": args.warmup,
                "rounds": args.rounds, "flops_convention": "a multiply-add counts as 2 FLOPs"}
    rows = [{"run": os.path.basename(os.path.normpath(run.directory)), "directory": run.directory,
             "model": describe(run.cfg, model), "input": "x".join(map(str, run.cfg.INPUT.SIZE_TEST)),
             **run.results, "parameters": sum(p.numel() for p in model.parameters()),
             "flops_per_image": f, "images_per_s": s, "speed_vs_first": v}
            for run, model, f, s, v in zip(runs, models, flops, speeds, relative)]

    table = markdown(rows, settings)
    with open(os.path.join(args.output, "compare.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output, "compare.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2)
    plot(rows, settings, os.path.join(args.output, "compare.png"))
    print(table + f"-> {args.output}/compare.md, compare.png, compare.json")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError, FlopCountError) as exc:
        sys.exit(f"error: {exc}")
