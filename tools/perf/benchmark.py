#!/usr/bin/env python
"""Speed and memory of PromptSG against the CLIP visual-only baseline (same tower, same batch).

    python tools/perf/benchmark.py --config-file projects/PromptSG/configs/Market1501/vit.yml \\
        MODEL.CLIP.PRETRAINED ""                      # random CLIP weights are fine for speed
    python tools/perf/benchmark.py --config-file CFG --batch 16 --test-batch 32 --iters 2 --rounds 3
    python tools/perf/benchmark.py --config-file CFG --data-wait 50      # time spent waiting on data

Both models are built in one process, warmed up, then timed in interleaved rounds (baseline,
PromptSG, then PromptSG, baseline, ...) so that machine noise hits both alike; the median over
rounds is reported. The baseline is the given config with the visual-only overrides of
configs/Market1501/clip_baseline.yml (``BASELINE_OVERRIDES`` of promptsg.analysis.baseline_benchmark,
which holds the harness).

  * training: forward + backward + optimizer step (the project's Trainer.build_optimizer) on synthetic
    images of INPUT.SIZE_TRAIN in FastReID's P x K layout (SOLVER.IMS_PER_BATCH images,
    DATALOADER.NUM_INSTANCE per identity), under bf16 autocast when SOLVER.AMP.ENABLED and CUDA
    supports it (fp16 with a GradScaler otherwise), as promptsg.engine.compat's AMPTrainer trains;
  * inference: eval mode under torch.inference_mode (and the same autocast on CUDA), batch
    TEST.IMS_PER_BATCH, for both MODEL.PROMPTSG.INFERENCE_PROMPT modes;
  * memory: the bytes held by the model and optimizer (parameters, gradients, optimizer state)
    and the peak on top of them during a step (CUDA: torch.cuda.max_memory_allocated; CPU: peak
    resident set size from resource.getrusage, its high-water mark reset through
    /proc/self/clear_refs after glibc's malloc_trim where Linux allows it).

``--data-wait N`` instead trains the given config on FastReID's real train loader
(Trainer.build_train_loader; datasets under $FASTREID_DATASETS) for N steps and reports
the share of step time spent in ``next(loader)``.

Output: one JSON object per line (stdout, and ``--out FILE``), then a plain-text table.
"""
import argparse
import sys

import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.baseline_benchmark import Recorder, run_benchmark, run_data_wait
from promptsg.engine.preflight import InputError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda if available (overrides MODEL.DEVICE)")
    parser.add_argument("--iters", type=int, default=5, help="steps per timed measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement, once")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--test-batch", type=int, default=None, help="inference batch (TEST.IMS_PER_BATCH)")
    parser.add_argument("--data-wait", type=int, default=0, metavar="N",
                        help="instead: N training steps on the real train loader, report the data-wait share")
    phases = parser.add_mutually_exclusive_group()
    phases.add_argument("--train-only", action="store_true", help="time training steps only, no inference")
    phases.add_argument("--inference-only", action="store_true", help="time inference only, no training")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON lines here")
    parser.add_argument("--tag", default=None, help="a label added to every JSON line")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = Recorder(args.out, args.tag)
    try:
        if args.data_wait > 0:
            run_data_wait(args, record)
        else:
            run_benchmark(args, record)
    finally:
        record.close()
    return record.records


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:
        sys.exit(f"error: {exc}")
