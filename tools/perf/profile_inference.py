#!/usr/bin/env python
"""Where PromptSG's inference time goes against the visual-only baseline: torch.profiler's self CPU
time per operator of each model (ViT-B/16 at 256x128, random weights, batch 32, 1 thread, the
simplified prompt), sorted by what PromptSG adds.

    python tools/perf/profile_inference.py OUT.json [KEY VALUE ...]    # e.g. MODEL.PROMPTSG.MIM.FUSION attention
"""
import sys, json, time
import torch
import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.baseline_benchmark import BASELINE_OVERRIDES, Variant, setup_cfg
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(1)
config_file = "projects/PromptSG/configs/Market1501/vit.yml"
opts = ["MODEL.CLIP.PRETRAINED", "", "SOLVER.AMP.ENABLED", "False", *sys.argv[2:]]
device = torch.device("cpu")
cfg_p = setup_cfg(config_file, opts, "cpu", test_batch=32)
cfg_b = setup_cfg(config_file, opts, "cpu", test_batch=32, extra_opts=BASELINE_OVERRIDES)
out = {}
for name, cfg, prompt in (("baseline", cfg_b, "visual"), ("promptsg", cfg_p, "simplified")):
    v = Variant(name, cfg, device)
    batch = v.test_batch(32)
    for _ in range(2):
        v.infer(batch, prompt)
    times = []
    for _ in range(3):
        t = time.perf_counter(); v.infer(batch, prompt); times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            v.infer(batch, prompt)
    ops = {}
    for e in prof.key_averages():
        ops[e.key] = e.self_cpu_time_total / 2 / 1e3   # ms per forward
    out[name] = {"seconds": sorted(times)[1], "ops": ops}
    print(name, "median forward s", round(sorted(times)[1], 4), "profiled total ms", round(sum(ops.values()), 1), flush=True)
b, p = out["baseline"]["ops"], out["promptsg"]["ops"]
diff = sorted(((p.get(k, 0) - b.get(k, 0), k, b.get(k, 0), p.get(k, 0)) for k in set(b) | set(p)), reverse=True)
print("ratio (baseline s / promptsg s):", round(out["baseline"]["seconds"] / out["promptsg"]["seconds"], 4))
print(f"{'op':40s} {'baseline ms':>12s} {'promptsg ms':>12s} {'extra ms':>10s}")
for d, k, x, y in diff[:25]:
    print(f"{k:40s} {x:12.2f} {y:12.2f} {d:10.2f}")
json.dump(out, open(sys.argv[1], "w"), indent=1)
