#!/usr/bin/env python
"""Why the simplified prompt scores below the composed one: which part of the composed MIM query
the feature needs.

    python tools/probe_simplified_gap.py logs/synthetic/promptsg_small_vit
    python tools/probe_simplified_gap.py logs/synthetic/ablations/ablations/full/seed{0,1,2}

With the paper's recipe the MIM only ever sees composed prompts "A photo of a s* person." as its
query; at test the simplified prompt "A photo of a person." is one fixed query it never saw. This
tool evaluates one PromptSG checkpoint (FastReID's test path and protocol, the run's own TEST
settings) with the MIM query set to

  * the simplified prompt's embedding l_simple (the paper's efficient test prompt),
  * the mean composed prompt of the training images, l_mean, and the points between,
    (1 - a) l_simple + a l_mean for each ``--alphas`` value: fixed queries like l_simple, at the
    same test cost, moving towards the queries the MIM was trained on,
  * one training image's composed prompt, the same for every test image (``--training-prompts``
    images, one at a time): a fixed query that is one of the training queries,
  * each image's own composed prompt l_p (the paper's accurate test prompt),
  * another identity's composed prompt for each image (a control: a per-image query of the
    training kind that describes someone else),

and, as a reference, ranks by the composed prompt l_p alone (cosine, no MIM): what s* = f_theta(v)
tells about the person. It prints each query's mAP and Rank-1 beside its mean cosine to the
training images' composed prompts. If the gap came from a query unlike the training queries, the
fixed training-like queries would close it; if it comes from what the image's own s* tells the
MIM, only the own prompt scores high and the wrong person's prompt scores low. Also prints how far
the test images' composed prompts lie from l_simple and from l_mean. With several runs (seeds) the
table gives the mean and standard deviation over them. Writes
``<--output>/<dataset>_simplified_gap_<date>_<commit>.json`` (every run's rows and the summary) and
``.md`` (the table). The probe is ``promptsg.analysis.simplified_gap``.
"""
import argparse
import os
import sys
import time


import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.simplified_gap import markdown, probe_run, run_config, summarise
from promptsg.engine.checkpoint import NonFiniteError
from promptsg.engine.preflight import InputError
from promptsg.utils.records import machine_words, run_record, tool_command, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="DIR",
                        help="PromptSG training runs (config.yaml, model_final.pth); several: mean and spread")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75], metavar="A",
                        help="points (1 - a) l_simple + a l_mean between the two fixed queries")
    parser.add_argument("--training-prompts", type=int, default=5, metavar="N",
                        help="training images whose composed prompt is tried as the one fixed query")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks"), metavar="DIR")
    args = parser.parse_args(argv)
    if args.training_prompts < 1:
        parser.error(f"--training-prompts must be >= 1, got {args.training_prompts}")
    if any(not 0.0 <= a <= 1.0 for a in args.alphas):
        parser.error(f"--alphas must lie in [0, 1], got {args.alphas}")
    return args


def main(argv=None):
    args = parse_args(argv)
    root = os.getenv("FASTREID_DATASETS", "datasets")
    cfgs = [run_config(run_dir) for run_dir in args.runs]     # every run refused or accepted before any work
    start = time.time()
    runs = [probe_run(run_dir, cfg, args.alphas, args.training_prompts, root)
            for run_dir, cfg in zip(args.runs, cfgs)]
    summary = summarise(runs)
    record = run_record(f"FASTREID_DATASETS={root} " + tool_command(__file__, sys.argv[1:] if argv is None else argv))
    date, rev = record["date"], record["commit"]
    results = {
        **record, "machine": {**record["machine"], "device": runs[0]["device"]},
        "summary": summary, "runs": runs, "seconds": round(time.time() - start, 1),
    }
    notes = (f"\n`{results['command']}`; {date}, commit {rev}, {machine_words(record)}, "
             f"device {results['machine']['device']}; {results['seconds']:.0f} s")
    text = markdown(summary, len(runs))
    print(text + "\n" + notes)
    name = runs[0]["dataset"]["name"]
    paths = write_record(os.path.join(args.output, f"{name.lower()}_simplified_gap_{date}_{rev}"), results,
                         text + "\n" + notes)
    print("-> " + ", ".join(paths))
    return results


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
