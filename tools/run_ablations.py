#!/usr/bin/env python
"""The paper's ablations (Tables 3-5) on the embedded synthetic benchmark, several seeds per row.

    python tools/run_ablations.py                                  # Tables 3-5 and the extra row, seeds 0 1 2
    python tools/run_ablations.py --rows full clip_baseline --seeds 0 1 2 3
    python tools/run_ablations.py --table diagnosis --seeds 0      # the experiments behind the defaults
    python tools/run_ablations.py --table wiring --seeds 0 1 2                  # the MIM wiring table
    python tools/run_ablations.py --readme docs/EXPERIMENTS.md --out benchmarks/ablations.json
    python tools/run_ablations.py --table wiring --seeds 0 1 2 3 4 --jobs 2     # two runs at once
    python tools/run_ablations.py --merge seeds012.json seeds34.json --out seeds01234.json   # one table
    python tools/run_ablations.py --merge old.json:clip_baseline_b32_e24 new.json --out both.json  # a row of old.json

Every row is ``tools/train_net.py`` on a config of ``projects/PromptSG/configs/Synthetic/`` with
the row's overrides and ``SEED s``, from the small CLIP that ``tools/pretrain_synthetic_clip.py``
pretrains on synthetic captions (reused when present). A row with a MIM that composes s* in
training is evaluated with both test-time prompts (the composed one with ``--eval-only``). Per
row: mean and standard deviation over the seeds of mAP and Rank-1 per prompt, and of the
alignment at the end of training (``loss_supcon`` over its chance level, in-batch top-1, collapse
monitors; ``promptsg.modeling.diagnostics``). Writes a JSON (every run and the summary) and a markdown
table; ``--readme`` replaces the table between the README's ``<!-- ablations:TABLE:start -->`` and
``<!-- ablations:TABLE:end -->`` markers. Runs already finished in ``--work-dir`` are reused.
``--merge`` trains nothing: it makes one table of the runs in several of this tool's JSONs (seeds
run at different times or on different machines), each source named with its command, date,
commit and machine. The tables, a row's runs and their summary are ``promptsg.analysis.ablations``.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG and the synthetic dataset)
from fastreid.data.datasets import DATASET_REGISTRY
from promptsg.analysis.ablations import (TABLES, markers, merged_table, replace_between_markers, run_one,
                                         summarise, tables_text)
from promptsg.analysis.guidance import PromptGuidance
from promptsg.engine.preflight import InputError
from promptsg.utils.records import machine_words, run_record, tool_command, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default=None, help="(default: ablations)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="a subset of the table's rows (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work-dir", default=os.path.join("logs", "synthetic", "ablations"))
    parser.add_argument("--out", default=None, help="JSON of every run and the summary "
                                                    "(default: WORK_DIR/TABLE.json)")
    parser.add_argument("--readme", default=None, help="a README whose table between the markers is replaced")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--guidance", action="store_true",
                        help="also measure what the prompt does at test in every run with a MIM and composed "
                             "prompts (promptsg.analysis.guidance; the same seed's clip_baseline run for the "
                             "baseline's attention), and write that table too")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with CPUs / JOBS torch threads (default 1: torch's own)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="train nothing: one table of the runs in these JSONs of this tool (needs --out; "
                             "--rows picks rows; FILE.json:ROW,ROW takes only those rows of a file)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)
    if args.merge:
        given = [flag for flag, value in (("--guidance", args.guidance),
                                          ("--readme", args.readme), ("overrides", args.opts)) if value]
        if given:
            parser.error(f"--merge takes no {given[0]}: it trains and measures nothing")
        if not args.out:
            parser.error("--merge needs --out, the merged JSON")
        return args
    args.table = args.table or "ablations"
    rows = {key for key, *_ in TABLES[args.table]}
    unknown = [r for r in args.rows or [] if r not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown} of --table {args.table}; choose from {sorted(rows)}")
    if len(args.opts) % 2:
        parser.error("overrides must be KEY VALUE pairs")
    if args.readme:
        start, end = markers(args.table)
        if not os.path.isfile(args.readme):
            parser.error(f"--readme {args.readme}: no such file")
        with open(args.readme) as f:
            content = f.read()
        if start not in content or end not in content:
            parser.error(f"--readme {args.readme} has no {start} ... {end} markers")
    return args


def merge_main(args, argv):
    """``--merge``: one table of the runs in several JSONs of this tool, written as ``--out`` (.json, .md)."""
    merged = merged_table(args.merge, args.table, args.rows)
    record = run_record(tool_command(__file__, sys.argv[1:] if argv is None else argv))
    text = merged["text"] + "\n\nMerged by `{}` ({}, commit {}) from:\n{}".format(
        record["command"], record["date"], record["commit"], merged["sources_text"])
    print("\n" + text)
    write_record(os.path.splitext(args.out)[0],
                 {"table": merged["table"], "seeds": merged["seeds"], **record, "merged_from": merged["sources"],
                  "rows": merged["rows"], "summary": merged["summaries"], "runs": merged["records"]}, text)
    return merged["summaries"]


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge_main(args, argv)
    # the commit and machine the runs start from (training subprocesses import this checkout)
    record = run_record(" ".join(["python tools/run_ablations.py --table", args.table, "--seeds", *map(str, args.seeds),
                                  *(["--rows", *args.rows] if args.rows else []),
                                  *(["--guidance"] if args.guidance else []),
                                  *(["--jobs", str(args.jobs)] if args.jobs > 1 else []), *args.opts]))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = os.getenv("FASTREID_DATASETS", "datasets")
    checkpoint = os.path.join(root, "SyntheticCLIP", "small-ViT.pt")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_synthetic_clip.py"), "--out", checkpoint],
                   check=True)
    # The synthetic dataset is generated on first use: once here, not by several runs at once.
    DATASET_REGISTRY.get("SyntheticMarket")(root=root)
    common = ["MODEL.DEVICE", device, "MODEL.CLIP.PRETRAINED", checkpoint, *args.opts]
    rows = [r for r in TABLES[args.table] if not args.rows or r[0] in args.rows]
    work_dir = os.path.join(args.work_dir, args.table)
    start = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, row, seed, common, work_dir, threads) for row in rows for seed in args.seeds]
        records = []
        for future in futures:
            records.append(future.result())
            print(json.dumps(records[-1]), flush=True)
    if args.guidance:
        guidance = PromptGuidance(root)
        for run in records:
            if "composed" in run["results"]:
                baseline = os.path.join(work_dir, "clip_baseline", f"seed{run['seed']}")
                run["guidance"] = guidance.measure(
                    run["output_dir"], baseline if os.path.isfile(os.path.join(baseline, "model_final.pth")) else None)
                print(json.dumps({"row": run["row"], "seed": run["seed"], "guidance": run["guidance"]}),
                      flush=True)
    summaries = {row[0]: summarise([r for r in records if r["row"] == row[0]]) for row in rows}
    text = tables_text(args.table, summaries, args.seeds, args.guidance)
    elapsed = time.perf_counter() - start
    run_seconds = sum(r["train_seconds"] + r.get("eval_seconds", 0.0) for r in records)
    footer = (f"\n\n`{record['command']}`; {record['date']}, commit {record['commit']}, "
              f"{machine_words(record)}, device {device}, "
              f"{threads or torch.get_num_threads()} torch thread(s) per run, {args.jobs} at a time; "
              f"{run_seconds / 60:.0f} min of training and evaluation in all (this invocation: {elapsed / 60:.0f} min, "
              f"runs already in {work_dir} reused).")
    print("\n" + text + footer)
    out = args.out or os.path.join(work_dir, f"{args.table}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"table": args.table, "seeds": args.seeds, "device": device, **record,
                   "wall_seconds": elapsed, "run_seconds": run_seconds,
                   "overrides": args.opts, "jobs": args.jobs, "torch_threads_per_run": threads or torch.get_num_threads(),
                   "rows": {key: {"label": label, "config": os.path.relpath(config, ROOT), "overrides": overrides}
                            for key, label, config, overrides in rows},
                   "summary": summaries, "runs": records}, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text + footer + "\n")
    if args.readme:
        replace_between_markers(args.readme, args.table, text + footer)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:
        sys.exit(f"error: {exc}")
