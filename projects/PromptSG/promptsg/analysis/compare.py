"""Trained runs side by side (tools/compare.py): each run folder read and checked, its inference
model built, and the table and the plot of accuracy against speed.

A run is an OUTPUT_DIR of tools/train_net.py: ``config.yaml``, ``model_final.pth`` and
``results.json``, or an ``--eval-only`` OUTPUT_DIR (``eval_results.json``, the checkpoint its
MODEL.WEIGHTS names). A run ``X`` beside an ``X_composed`` folder gives both rows.
"""
import json
import logging
import os
import re
import warnings
from typing import NamedTuple

from fastreid.config import get_cfg


from ..config import add_promptsg_config
from ..engine.checkpoint import load_for_inference
from ..engine.preflight import InputError, check_torch_file, load_config
from ..engine.trainer import Trainer

METRICS = ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")
COMPOSED_SUFFIX = "_composed"


class Run(NamedTuple):
    """One row: a run folder, its config (for inference, on the CPU), checkpoint and metrics, and
    its training's seconds where results.json has them (``timing``: stage1_seconds for CLIP-ReID,
    train_seconds, evaluation_seconds)."""
    directory: str
    cfg: object
    weights: str
    results: dict
    timing: dict = {}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})") from None


def read_results(directory):
    """The metrics of a run folder, results.json (training) or else eval_results.json
    (--eval-only), and the training's timing (empty for an --eval-only run or an older one)."""
    for name in ("results.json", "eval_results.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            results = read_json(path)
            missing = [k for k in METRICS if not isinstance(results, dict) or k not in results]
            if missing:
                raise InputError(f"{path} has no {', '.join(missing)} (not written by tools/train_net.py?)")
            timing = results.get("timing") if isinstance(results.get("timing"), dict) else {}
            return name, {k: float(results[k]) for k in METRICS}, timing
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
    results_name, results, timing = read_results(directory)
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
    return Run(directory, cfg, weights, results, timing)


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
            model = Trainer.build_model(run.cfg)
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
    if cfg.MODEL.META_ARCHITECTURE == "CLIPReID":
        return f"CLIP-ReID ({cfg.MODEL.CLIP.NAME})"
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


def machine(record):
    """The CPU model of a ``run_record``'s machine, its cores and whether a GPU was there (none is used)."""
    m = record["machine"]
    return f"{m['cpu']}, {m['cpus']} CPU cores, no GPU used" + ("" if "gpu" in m else " (none present)")


def threads(settings):
    return f"{settings['threads']} torch thread{'s' if settings['threads'] != 1 else ''}"


def markdown(rows, settings):
    """The table of ``rows`` and how it was measured (``settings``), as compare.md holds it."""
    lines = [
        f"Measured {settings['date']} (UTC), commit {settings['commit']}, {settings['machine']}; "
        f"torch {settings['torch']}, {threads(settings)}.",
        "",
        "| Run | Model | Test input | mAP | Rank-1 | Rank-5 | Rank-10 | mINP | Parameters (M) | GFLOPs / image "
        "| Images/s | Speed / first row | Training (min) |",
        "|:--|:--|:-:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['input']} | {r['mAP']:.1f} | {r['Rank-1']:.1f} | "
                     f"{r['Rank-5']:.1f} | {r['Rank-10']:.1f} | {r['mINP']:.1f} | {r['parameters'] / 1e6:.2f} | "
                     f"{r['flops_per_image'] / 1e9:.3f} | {r['images_per_s']:.0f} | "
                     f"{r['speed_vs_first']:.2f}x | {training_minutes(r.get('timing', {}))} |")
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
        "Model forward only: no data loading, no flip test. Training: the run's own results.json, minutes of "
        "training steps without the evaluations, as stage 1 + stage 2 for CLIP-ReID (its stage 1 includes "
        "computing the training images' features once); '-' where the run did not record it.",
    ]
    return "\n".join(lines) + "\n"


def training_minutes(timing):
    """"stage 1 + stage 2" minutes for CLIP-ReID, the training's minutes otherwise, "-" if not recorded."""
    if "train_seconds" not in timing:
        return "-"
    stage2 = f"{timing['train_seconds'] / 60:.1f}"
    return f"{timing['stage1_seconds'] / 60:.1f} + {stage2}" if "stage1_seconds" in timing else stage2


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
