#!/usr/bin/env python
"""The paper's ablations (Tables 3-5) on the embedded synthetic benchmark, several seeds per row.

    python tools/run_ablations.py                                  # Tables 3-5 and the extra row, seeds 0 1 2
    python tools/run_ablations.py --rows full clip_baseline --seeds 0 1 2 3
    python tools/run_ablations.py --table diagnosis --seeds 0      # the experiments behind the defaults
    python tools/run_ablations.py --table wiring --seeds 0 1 2                  # the MIM wiring table
    python tools/run_ablations.py --readme docs/EXPERIMENTS.md --out benchmarks/ablations.json

Every row is ``tools/train_net.py`` on a config of ``projects/PromptSG/configs/Synthetic/`` with
the row's overrides and ``SEED s``, from the small CLIP that ``tools/pretrain_synthetic_clip.py``
pretrains on synthetic captions (reused when present). A row with a MIM that composes s* in
training is evaluated with both test-time prompts (the composed one with ``--eval-only``). Per
row: mean and standard deviation over the seeds of mAP and Rank-1 per prompt, and of the
alignment at the end of training (``loss_supcon`` over its chance level, in-batch top-1, collapse
monitors; ``promptsg.modeling.diagnostics``). Writes a JSON (every run and the summary) and a markdown
table; ``--readme`` replaces the table between the README's ``<!-- ablations:TABLE:start -->`` and
``<!-- ablations:TABLE:end -->`` markers. Runs already finished in ``--work-dir`` are reused.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "projects", "PromptSG", "configs", "Synthetic")
PROMPTSG = os.path.join(SYNTHETIC, "promptsg_small_vit.yml")
BASELINE = os.path.join(SYNTHETIC, "clip_baseline_small_vit.yml")
NO_MIM = ["MODEL.PROMPTSG.MIM.CROSS_LAYERS", "0", "MODEL.PROMPTSG.MIM.SELF_LAYERS", "0"]
ID_AND_TRIPLET = ["MODEL.LOSSES.NAME", '("CrossEntropyLoss", "TripletLoss")']
REA = ["INPUT.REA.ENABLED", "True"]
OLD = REA + ["MODEL.LOSSES.SUPCON.POSITIVES", "mean", "MODEL.PROMPTSG.PSEUDO_TOKEN_INIT", "unit",
             "MODEL.LOSSES.SUPCON.TEMPERATURE", "0.07"]

SHARE = ["MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE", "0.5"]


def fusion(name):
    return ["MODEL.PROMPTSG.MIM.FUSION", name]


# table -> [(row key, paper label, config, overrides)]
TABLES = {
    "ablations": [
        ("clip_baseline", "CLIP baseline (ID + triplet, no text)", BASELINE, []),
        ("supcon_no_mim", "Table 3 d: + L_SupCon, no MIM", PROMPTSG, NO_MIM),
        ("i2t_only", "Table 3 c: L_i2t only (w/o L_t2i)", PROMPTSG, ["MODEL.LOSSES.SUPCON.T2I", "False"]),
        ("t2i_only", "Table 3 b: L_t2i only (w/o L_i2t)", PROMPTSG, ["MODEL.LOSSES.SUPCON.I2T", "False"]),
        ("full", "Table 3 a / Table 5: PromptSG, 1 cross + 2 self (default: MIM.FUSION reweight)", PROMPTSG, []),
        ("paper_recipe", "... Eq. 7 as written (MIM.FUSION attention; ablations/paper_recipe.yml)", PROMPTSG,
         fusion("attention")),
        ("query_residual", "... the query added back (MIM.FUSION query_residual, the wiring before)", PROMPTSG,
         fusion("query_residual")),
        ("wo_composed", "Table 4: training w/o composed (simplified prompt, no L_SupCon)", PROMPTSG,
         ID_AND_TRIPLET + ["MODEL.PROMPTSG.COMPOSE_TRAIN", "False"]),
        ("mim_1cross", "Table 5: 1 cross, 0 self (MIM.FUSION attention: the cross-attention's output)", PROMPTSG,
         ["MODEL.PROMPTSG.MIM.SELF_LAYERS", "0"] + fusion("attention")),
        ("mim_1cross_1self", "Table 5: 1 cross, 1 self", PROMPTSG, ["MODEL.PROMPTSG.MIM.SELF_LAYERS", "1"]),
        ("simplified_share", "Beyond the paper: half the MIM queries simplified in training", PROMPTSG, SHARE),
    ],
    # The MIM's wiring where the paper is silent (MODEL.PROMPTSG.MIM.FUSION), alone and with half the
    # training queries simplified (SIMPLIFIED_QUERY_SHARE 0.5).
    "wiring": [
        ("clip_baseline", "CLIP baseline (ID + triplet, no text)", BASELINE, []),
        ("query_residual", "query_residual: x = q + A(q, P)", PROMPTSG, fusion("query_residual")),
        ("attention", "attention: x = A(q, P) (Eq. 7)", PROMPTSG, fusion("attention")),
        ("visual_residual", "visual_residual: x = v + A(q, P)", PROMPTSG, fusion("visual_residual")),
        ("reweight", "reweight: [v; a * P] through the blocks, read at v", PROMPTSG, fusion("reweight")),
        ("query_residual_share", "query_residual + SIMPLIFIED_QUERY_SHARE 0.5", PROMPTSG,
         fusion("query_residual") + SHARE),
        ("attention_share", "attention + SIMPLIFIED_QUERY_SHARE 0.5", PROMPTSG, fusion("attention") + SHARE),
        ("visual_residual_share", "visual_residual + SIMPLIFIED_QUERY_SHARE 0.5", PROMPTSG,
         fusion("visual_residual") + SHARE),
        ("reweight_share", "reweight + SIMPLIFIED_QUERY_SHARE 0.5", PROMPTSG, fusion("reweight") + SHARE),
        ("attention_concat", "attention, test feature MIM output ++ v (FEATURE concat)", PROMPTSG,
         fusion("attention") + ["MODEL.PROMPTSG.FEATURE", "concat"]),
    ],
    # The experiments behind the defaults (docs/EXPERIMENTS.md, "What was wrong"); OLD is the main job as
    # it was: SupCon averaged over the positives, s* at BatchNorm's unit scale, random erasing.
    "diagnosis": [
        ("base", "CLIP baseline, ID + triplet (defaults)", BASELINE, []),
        ("base_rea", "CLIP baseline with random erasing", BASELINE, REA),
        ("base_rea_id_only", "... and the ID loss only", BASELINE, REA + ["MODEL.LOSSES.NAME", '("CrossEntropyLoss",)']),
        ("base_rea_triplet_on_v", "... and the triplet on v only (no visual states)", BASELINE,
         REA + ["MODEL.PROMPTSG.TRIPLET_ON_VISUAL_STATES", "False"]),
        ("base_rea_soft_margin", "... and a soft-margin triplet", BASELINE, REA + ["MODEL.LOSSES.TRI.MARGIN", "0.0"]),
        ("base_rea_lr_5e-5", "... and encoder lr 5e-5 (10x lower)", BASELINE, REA + ["SOLVER.BASE_LR", "0.00005"]),
        ("old", "PromptSG as it was (SupCon mean over positives, unit s*, erasing)", PROMPTSG, OLD),
        ("old_sum", "... with SupCon summed over the positives (Eq. 5-6)", PROMPTSG,
         REA + ["MODEL.PROMPTSG.PSEUDO_TOKEN_INIT", "unit"]),
        ("old_sum_token", "... and s* starting at the word-embedding scale", PROMPTSG, REA),
        ("old_sum_token_tau_0.03", "... with tau 0.03 instead of CLIP's 0.071", PROMPTSG,
         REA + ["MODEL.LOSSES.SUPCON.TEMPERATURE", "0.03"]),
        ("old_sum_token_tau_0.01", "... with tau 0.01", PROMPTSG, REA + ["MODEL.LOSSES.SUPCON.TEMPERATURE", "0.01"]),
        ("old_supcon_only", "... L_SupCon alone", PROMPTSG, REA + ["MODEL.LOSSES.NAME", '("SupConLoss",)']),
        ("old_supcon_only_frozen_v", "... L_SupCon alone, encoder frozen (lr 5e-8), heads lr 5e-3", PROMPTSG,
         REA + ["MODEL.LOSSES.NAME", '("SupConLoss",)', "SOLVER.BASE_LR", "0.00000005",
                "SOLVER.HEADS_LR_FACTOR", "100000.0"]),
        ("defaults", "PromptSG now: summed SupCon, s* at word scale, no erasing", PROMPTSG, []),
    ],
}
METRICS = ("mAP", "Rank-1")
ALIGNMENT = ("supcon_over_chance", "align_i2t_top1", "align_t2i_top1", "collapse_v_cos", "collapse_text_cos",
             "pseudo_token_norm_ratio")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="ablations")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="a subset of the table's rows (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work-dir", default=os.path.join("logs", "synthetic", "ablations"))
    parser.add_argument("--out", default=None, help="JSON of every run and the summary "
                                                    "(default: WORK_DIR/TABLE.json)")
    parser.add_argument("--readme", default=None, help="a README whose table between the markers is replaced")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)
    rows = {key for key, *_ in TABLES[args.table]}
    unknown = [r for r in args.rows or [] if r not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown} of --table {args.table}; choose from {sorted(rows)}")
    if len(args.opts) % 2:
        parser.error("overrides must be KEY VALUE pairs")
    if args.readme:
        markers = (f"<!-- ablations:{args.table}:start -->", f"<!-- ablations:{args.table}:end -->")
        if not os.path.isfile(args.readme):
            parser.error(f"--readme {args.readme}: no such file")
        with open(args.readme) as f:
            content = f.read()
        if not all(m in content for m in markers):
            parser.error(f"--readme {args.readme} has no {markers[0]} ... {markers[1]} markers")
    return args


def train_net(args, log_path):
    """tools/train_net.py with ``args``, its output to ``log_path``; raises with the log's tail on failure."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), *args]
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (log: {log_path}):\n{tail}")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def row_prompts(config, overrides):
    """The test-time prompts of a row: ("visual",) without a MIM (the feature is v), else the
    simplified prompt and, where f_theta is trained, the composed one."""
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    if config == BASELINE or pairs.get("MODEL.PROMPTSG.MIM.CROSS_LAYERS") == "0":
        return ("visual",)
    if pairs.get("MODEL.PROMPTSG.COMPOSE_TRAIN") == "False":
        return ("simplified",)
    return ("simplified", "composed")


def run_one(row, seed, common, work_dir):
    """Train (or reuse) one row with one seed and evaluate it with its prompts; returns its record."""
    from promptsg.modeling.diagnostics import alignment_report

    key, label, config, overrides = row
    out_dir = os.path.join(work_dir, key, f"seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    record = {"row": key, "seed": seed, "output_dir": out_dir}
    results_path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(results_path):
        start = time.perf_counter()
        # --resume: a run interrupted before its results continues from its last checkpoint.
        train_net(["--config-file", config, "--resume", *common, *overrides, "SEED", str(seed),
                   "OUTPUT_DIR", out_dir],
                  os.path.join(out_dir, "train.out"))
        record["train_seconds"] = time.perf_counter() - start
    else:   # reused: from the run's first file (its config) to its last (the results)
        record["train_seconds"] = os.path.getmtime(results_path) - os.path.getmtime(os.path.join(out_dir, "config.yaml"))
    prompts = row_prompts(config, overrides)
    record["results"] = {prompts[0]: {m: read_json(results_path)[m] for m in METRICS}}   # train_net's own
    if "composed" in prompts:
        composed_dir = os.path.join(out_dir, "composed")
        composed_path = os.path.join(composed_dir, "eval_results.json")
        if os.path.isfile(composed_path):
            record["eval_seconds"] = (os.path.getmtime(composed_path)
                                      - os.path.getmtime(os.path.join(composed_dir, "config.yaml")))
        else:
            os.makedirs(composed_dir, exist_ok=True)
            start = time.perf_counter()
            train_net(["--config-file", config, "--eval-only", *common, *overrides,
                       "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"),
                       "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "OUTPUT_DIR", composed_dir],
                      os.path.join(composed_dir, "eval.out"))
            record["eval_seconds"] = time.perf_counter() - start
        record["results"]["composed"] = {m: read_json(composed_path)[m] for m in METRICS}
    report, _ = alignment_report(out_dir)
    record["alignment"] = {k: report[k] for k in ALIGNMENT if k in report}
    return record


def summarise(records):
    """mean and std over the seeds of every metric of one row."""
    values = {}
    for r in records:
        for prompt, metrics in r["results"].items():
            for m, v in metrics.items():
                values.setdefault(f"{prompt}/{m}", []).append(v)
        for k, v in r["alignment"].items():
            values.setdefault(f"alignment/{k}", []).append(v)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
            for k, v in values.items()}


def markdown(table, summaries, seeds):
    """The summary as a markdown table (mean +- std over the seeds)."""
    def cell(summary, key, scale=1.0, digits=1):
        if key not in summary:
            return "-"
        s = summary[key]
        if len(s["runs"]) == 1:
            return f"{scale * s['mean']:.{digits}f}"
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"

    lines = [f"| Row ({'seed' if len(seeds) == 1 else f'{len(seeds)} seeds:'} {', '.join(map(str, seeds))}) | mAP, simplified / visual-only | "
             f"mAP, composed | Rank-1, simplified / visual-only | Rank-1, composed | "
             f"loss_supcon / chance at the end | image->prompt top-1 | pairwise cos of v |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for key, label, _, _ in TABLES[table]:
        if key not in summaries:
            continue
        s = summaries[key]
        first = "simplified" if "simplified/mAP" in s else "visual"
        lines.append(f"| {label} | {cell(s, first + '/mAP')} | {cell(s, 'composed/mAP')} | "
                     f"{cell(s, first + '/Rank-1')} | {cell(s, 'composed/Rank-1')} | "
                     f"{cell(s, 'alignment/supcon_over_chance', digits=2)} | "
                     f"{cell(s, 'alignment/align_i2t_top1', digits=2)} | {cell(s, 'alignment/collapse_v_cos', digits=2)} |")
    return "\n".join(lines)


def replace_between_markers(path, table, text):
    start, end = f"<!-- ablations:{table}:start -->", f"<!-- ablations:{table}:end -->"
    with open(path) as f:
        content = f.read()
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(before + start + "\n" + text + "\n" + end + after)


def machine():
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    import torch

    import promptsg  # noqa: F401  (FastReID's patches, for reading the runs' configs)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = os.getenv("FASTREID_DATASETS", "datasets")
    checkpoint = os.path.join(root, "SyntheticCLIP", "small-ViT.pt")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_synthetic_clip.py"), "--out", checkpoint],
                   check=True)
    common = ["MODEL.DEVICE", device, "MODEL.CLIP.PRETRAINED", checkpoint, *args.opts]
    rows = [r for r in TABLES[args.table] if not args.rows or r[0] in args.rows]
    work_dir = os.path.join(args.work_dir, args.table)
    start = time.perf_counter()
    records = []
    for row in rows:
        for seed in args.seeds:
            record = run_one(row, seed, common, work_dir)
            records.append(record)
            print(json.dumps(record), flush=True)
    summaries = {row[0]: summarise([r for r in records if r["row"] == row[0]]) for row in rows}
    text = markdown(args.table, summaries, args.seeds)
    elapsed = time.perf_counter() - start
    command = " ".join(["python tools/run_ablations.py --table", args.table, "--seeds", *map(str, args.seeds),
                        *(["--rows", *args.rows] if args.rows else []), *args.opts])
    run_seconds = sum(r["train_seconds"] + r.get("eval_seconds", 0.0) for r in records)
    footer = (f"\n\n`{command}`; {datetime.date.today()}, commit {commit()}, "
              f"{machine()['cpus']}-CPU {platform.machine()} machine, device {device}; "
              f"{run_seconds / 60:.0f} min of training and evaluation in all (this invocation: {elapsed / 60:.0f} min, "
              f"runs already in {work_dir} reused).")
    print("\n" + text + footer)
    out = args.out or os.path.join(work_dir, f"{args.table}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"table": args.table, "seeds": args.seeds, "device": device, "date": str(datetime.date.today()),
                   "commit": commit(), "machine": machine(), "wall_seconds": elapsed, "run_seconds": run_seconds, "overrides": args.opts,
                   "rows": {key: {"label": label, "config": os.path.relpath(config, ROOT), "overrides": overrides}
                            for key, label, config, overrides in rows},
                   "summary": summaries, "runs": records}, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text + footer + "\n")
    if args.readme:
        replace_between_markers(args.readme, args.table, text + footer)
    return summaries


if __name__ == "__main__":
    main()
