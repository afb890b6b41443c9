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
line naming it before anything is measured. The runs are read, counted and timed by
``promptsg.analysis.compare``, ``.flops`` and ``.speed``.
"""
import argparse
import json
import os
import sys

import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.compare import build, describe, find_runs, machine, markdown, plot
from promptsg.analysis.flops import FlopCountError, count_flops
from promptsg.analysis.speed import make_inputs, measure_speed
from promptsg.engine.checkpoint import NonFiniteError
from promptsg.engine.preflight import InputError
from promptsg.utils.records import run_record, tool_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    record = run_record(tool_command(__file__, sys.argv[1:] if argv is None else argv), " with local changes")
    settings = {"date": f"{record['date']} {record['time'][:5]}", "commit": record["commit"],
                "machine": machine(record), "torch": record["machine"]["torch"],
                "threads": record["machine"]["torch_threads"], "batch_size": args.batch_size, "warmup": args.warmup,
                "rounds": args.rounds, "flops_convention": "a multiply-add counts as 2 FLOPs"}
    rows = [{"run": os.path.basename(os.path.normpath(run.directory)), "directory": run.directory,
             "model": describe(run.cfg, model), "input": "x".join(map(str, run.cfg.INPUT.SIZE_TEST)),
             **run.results, "parameters": sum(p.numel() for p in model.parameters()),
             "flops_per_image": f, "images_per_s": s, "speed_vs_first": v, "timing": run.timing}
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
