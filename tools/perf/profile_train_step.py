#!/usr/bin/env python
"""Where a training step's time goes: PromptSG against the visual-only CLIP baseline.

Times forward, backward and optimizer step separately (CUDA-synchronised), then runs
torch.profiler over a few steps of each model and writes its top operators, so the overheads
that the speed ratios in tools/perf/benchmark.py hide can be attributed.

    python tools/perf/profile_train_step.py --config-file projects/PromptSG/configs/Market1501/vit.yml \
        --out output/profile MODEL.CLIP.PRETRAINED ""
"""
import argparse
import json
import os
import statistics
import time

from torch.profiler import ProfilerActivity, profile, record_function

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.utils.events import EventStorage
from promptsg.analysis import baseline_benchmark as benchmark   # config set-up and model variants


def phase_times(variant, batch, iters):
    """Median seconds of forward, backward and optimizer step over ``iters`` steps."""
    device = variant.device
    times = {"forward": [], "backward": [], "optimizer": []}
    variant.model.train()
    for _ in range(iters):
        benchmark.synchronize(device)
        t0 = time.perf_counter()
        with benchmark.autocast(device, variant.dtype):
            losses = sum(variant.model(batch).values())
        benchmark.synchronize(device)
        t1 = time.perf_counter()
        variant.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        benchmark.synchronize(device)
        t2 = time.perf_counter()
        variant.optimizer.step()
        benchmark.synchronize(device)
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="output/profile")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = benchmark.resolve_device(args.device)

    results = {}
    with EventStorage(0):  # FastReID's losses log into an event storage
        for name, extra in BASELINE_AND_PROMPTSG:
            results[name] = profile_variant(name, extra, device, args)
    with open(os.path.join(args.out, "phases.json"), "w") as f:
        json.dump({"device": str(device), "batch": args.batch, **results}, f, indent=2)


BASELINE_AND_PROMPTSG = (("baseline", benchmark.BASELINE_OVERRIDES), ("promptsg", ()))


def profile_variant(name, extra, device, args):
    """Phase times of one model variant, and its profiler tables written under ``args.out``."""
    cfg = benchmark.setup_cfg(args.config_file, args.opts, device.type, extra_opts=extra)
    cfg.MODEL.HEADS.NUM_CLASSES = cfg.MODEL.HEADS.NUM_CLASSES or benchmark.DEFAULT_NUM_CLASSES
    variant = benchmark.Variant(name, cfg, device)
    batch = variant.train_batch(args.batch)
    phase_times(variant, batch, 5)                                       # warm-up
    result = phase_times(variant, batch, args.iters)
    result["param_groups"] = len(variant.optimizer.param_groups)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            with record_function("forward"), benchmark.autocast(device, variant.dtype):
                losses = sum(variant.model(batch).values())
            variant.optimizer.zero_grad(set_to_none=True)
            with record_function("backward"):
                losses.backward()
            with record_function("optimizer"):
                variant.optimizer.step()
        benchmark.synchronize(device)
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_key, row_limit=40))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(name, json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
