#!/usr/bin/env python
"""Where PromptSG's text query looks, beside the CLIP baseline: attention maps drawn as PNG grids.

    # the test split of a dataset (query + gallery), against the CLIP baseline
    python tools/attention_maps.py --config-file logs/synthetic/promptsg_small_vit/config.yaml \\
        --baseline-config logs/synthetic/clip_baseline_small_vit/config.yaml \\
        --baseline-weights logs/synthetic/clip_baseline_small_vit/model_final.pth \\
        --dataset SyntheticMarket --output attention/ --num-vis 8 --per-head \\
        MODEL.WEIGHTS logs/synthetic/promptsg_small_vit/model_final.pth
    # chosen images (files or folders), PromptSG alone
    python tools/attention_maps.py --config-file CFG --images a.jpg b.jpg /data/cam1 --output DIR \\
        MODEL.WEIGHTS model.pth

Maps (promptsg/analysis/attention_maps.py; the shares inside the person in attention_shares.py,
the figures in attention_figures.py, the inputs' checks in attention_inputs.py): PromptSG's MIM
cross-attention of the prompt embedding over the
patch tokens (the paper's Fig. 1 and 5), for the simplified prompt "A photo of a person." and the
composed prompt "A photo of a s* person.", averaged over heads and per head; the baseline's map is
the CLS attention rollout through its visual transformer. The images go through FastReID's test
transforms, as in evaluation (no flip). ``KEY VALUE`` overrides apply to both configs;
MODEL.WEIGHTS is PromptSG's checkpoint, ``--baseline-weights`` the baseline's. Models with SIE
take the dataset's camera ids, or ``--camera`` for --images.

Images of a generated SyntheticMarket dataset come with their person's silhouette
(``promptsg.data.PersonMasks``): then the tool also measures the share of each map's mass
inside the person (the mask's coverage of each patch, weighted by the map), prints a table of the
means against the chance level (the mass a uniform map puts there, the mean coverage) and writes
``attention_in_person.json`` (or ``--shares-json``). Images without a person (background crops)
are left out of the means.

Writes to --output: ``attention_maps.png`` (one column per drawn image, ``--num-vis`` of them spread
evenly over the list: the image with its person outlined when known, then the baseline's map and
the two PromptSG maps as heatmaps over it, each with its share inside the person),
``attention_heads.png`` with ``--per-head`` (each head of both prompts), ``attention_maps.npz``
(every map of every image, on the patch grid) and the JSON above.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402

import promptsg  # noqa: E402,F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.attention_figures import draw_figure  # noqa: E402
from promptsg.analysis.attention_inputs import build_model, list_items, model_configs  # noqa: E402
from promptsg.analysis.attention_maps import (ModelMaps, compute_maps, mask_at_input, patch_coverage,  # noqa: E402
                                              patch_grid, save_maps)
from promptsg.analysis.attention_shares import person_masks, share_table, shares, summarise  # noqa: E402
from promptsg.engine.checkpoint import NonFiniteError  # noqa: E402
from promptsg.engine.preflight import InputError  # noqa: E402
from promptsg.utils.records import run_record, tool_command  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the PromptSG model's config")
    parser.add_argument("--baseline-config", metavar="FILE", help="the CLIP baseline's config")
    parser.add_argument("--baseline-weights", metavar="FILE", help="the CLIP baseline's checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders of images")
    source.add_argument("--dataset", metavar="NAME", help="a dataset's test split (query + gallery), "
                                                           "found under $FASTREID_DATASETS")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--num-vis", type=int, default=8, help="images drawn (spread evenly over the list)")
    parser.add_argument("--per-head", action="store_true", help="also draw every head's map")
    parser.add_argument("--camera", type=int, default=None,
                        help="camera index of --images for models with SIE (MODEL.CLIP.SIE_CAMERA)")
    parser.add_argument("--shares-json", metavar="FILE",
                        help="where the shares inside the person go (default OUTPUT/attention_in_person.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num_vis < 1:
        parser.error("--num-vis must be >= 1")
    if bool(args.baseline_config) != bool(args.baseline_weights):
        parser.error("--baseline-config and --baseline-weights go together")
    return args


def run_info(argv):
    """Date, commit and machine of this measurement."""
    return run_record(tool_command(__file__, argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfgs = model_configs(args.config_file, args.opts, args.baseline_config, args.baseline_weights,
                         images=bool(args.images), camera=args.camera)
    items = list_items(args.dataset, args.images, args.camera)
    masks = person_masks([path for path, _ in items])
    os.makedirs(args.output, exist_ok=True)

    results = {}
    for kind in ("baseline", "promptsg"):      # the figures and the table put the baseline first
        if kind in cfgs:
            cfg, model = cfgs[kind], build_model(cfgs[kind])
            grid = patch_grid(model.backbone)
            maps, images = compute_maps(cfg, model, items, kind)
            coverages = [patch_coverage(mask_at_input(m, cfg), grid) if m is not None else None for m in masks]
            results[kind] = ModelMaps(cfg, grid, maps, images, coverages)

    indices = np.unique(np.linspace(0, len(items) - 1, min(args.num_vis, len(items))).round().astype(int))
    written = ["attention_maps.png", "attention_maps.npz"]
    draw_figure(os.path.join(args.output, "attention_maps.png"), indices, items, results, masks, False, dpi=200)
    if args.per_head:
        draw_figure(os.path.join(args.output, "attention_heads.png"), indices, items, results, masks, True, dpi=150)
        written.append("attention_heads.png")
    save_maps(os.path.join(args.output, "attention_maps.npz"), items, results)

    per_image = shares(results)
    if not np.isnan(per_image["chance_promptsg"]).all():
        summary = {**run_info(argv), **summarise(per_image)}
        print(share_table(summary))
        json_path = args.shares_json or os.path.join(args.output, "attention_in_person.json")
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        written.append(json_path)
    print(f"{len(items)} images; {', '.join(written)} in {args.output}")
    return per_image


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
