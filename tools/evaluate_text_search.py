#!/usr/bin/env python
"""Text-aware search measured on the SyntheticMarket test split, with the generator's own captions.

    FASTREID_DATASETS=/tmp/demo/datasets python tools/evaluate_text_search.py \\
        --promptsg logs/synthetic/promptsg_small_vit --baseline logs/synthetic/clip_baseline_small_vit

Every test identity's words are what follows "a person" in the caption ``describe_person`` gives the
person its images were drawn from (``identity_captions``: the people are drawn again from the
dataset manifest's parameters), e.g. "with short black hair wearing a short-sleeved red shirt, blue
trousers and white shoes, carrying a black backpack".

  * Words only (tools/extract_features.py --text without --query): one query per test identity,
    "A photo of a person <words>." embedded by the CLIP text tower, ranking the gallery by cosine to
    the images' CLIP image embeddings v. Its positives are all of the identity's gallery images: a
    text has no camera, so none is left out (distractors stay in the gallery, junk images do not,
    as in the Market protocol). Also with the bare caption, the form the small CLIP was pretrained
    on.
  * Image and words (--text with --query): each query image with its identity's words, "A photo of
    a s* person <words>.", against the gallery's composed-prompt features, under the Market
    protocol; beside the image alone (composed prompt) and, as a control, the image with the words
    of another test identity (the next one, by pid, whose caption differs). Also against the
    simplified-prompt gallery ("A photo of a person.", the paper's test prompt), beside the image
    alone with the simplified prompt.

Models: the pretrained small CLIP zero-shot (--clip; words only, and its v for image-to-image as a
reference: without a trained inversion network there is no s*), PromptSG (--promptsg: both
searches, its own frozen text tower) and the CLIP baseline (--baseline: words only, with the
frozen text tower of the CLIP it was fine-tuned from, against its v, which is also its retrieval
feature). Each run directory needs config.yaml and model_final.pth. mAP and Rank-1 come from
FastReID's evaluate_rank; chance is a uniformly random ranking under the same protocol
(promptsg.engine.evaluation.chance_level).

Prints the table and writes it, with per-query figures, to
``<--output>/text_search_<date>_<commit>.json`` (and ``.md``). The searches and the table are
``promptsg.analysis.text_search_evaluation``.
"""
import argparse
import os
import sys
import time

from tqdm import tqdm

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis.text_search_evaluation import (EvaluationSplit, evaluate_clip, evaluate_promptsg, paired,
                                                      run_configs, same_tower, table)
from promptsg.engine.checkpoint import NonFiniteError
from promptsg.engine.preflight import InputError
from promptsg.utils.records import machine_words, run_record, tool_command, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    datasets = os.getenv("FASTREID_DATASETS", "datasets")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--promptsg", default="logs/synthetic/promptsg_small_vit", metavar="DIR",
                        help="PromptSG run directory (config.yaml, model_final.pth)")
    parser.add_argument("--baseline", default="logs/synthetic/clip_baseline_small_vit", metavar="DIR",
                        help="CLIP baseline run directory")
    parser.add_argument("--clip", default=os.path.join(datasets, "SyntheticCLIP", "small-ViT.pt"), metavar="FILE",
                        help="the pretrained CLIP both were fine-tuned from (MODEL.CLIP.PRETRAINED)")
    parser.add_argument("--dataset", default="SyntheticMarket", help="test set (a SyntheticMarket dataset)")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks"), metavar="DIR")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfgs = run_configs(args.promptsg, args.baseline, args.clip)
    start = time.time()
    split = EvaluationSplit(args.dataset, os.getenv("FASTREID_DATASETS", "datasets"))
    print(f"{args.dataset} test split: {len(split.query)} query images of {len(split.pids)} identities, "
          f"{len(split.gallery)} gallery images; captions: {split.caption_stats()}")

    bar = tqdm(total=11, desc="feature passes")
    seconds = {}

    def progress(name, step):
        bar.set_postfix_str(name)
        t0 = time.time()
        out = step()
        seconds[name] = round(time.time() - t0, 1)
        bar.update()
        return out

    models, towers = {}, {}
    models["clip_zero_shot"], towers["clip"] = evaluate_clip(split, cfgs["clip_zero_shot"], "zero-shot CLIP", progress)
    models["promptsg"], towers["promptsg"] = evaluate_promptsg(split, cfgs["promptsg"], progress)
    models["clip_baseline"], _ = evaluate_clip(split, cfgs["clip_baseline"], "CLIP baseline", progress)
    bar.close()

    record = run_record(f"FASTREID_DATASETS={os.getenv('FASTREID_DATASETS', 'datasets')} "
                        + tool_command(__file__, sys.argv[1:] if argv is None else argv))
    date, rev = record["date"], record["commit"]
    results = {
        **record, "machine": {**record["machine"], "device": cfgs["promptsg"].MODEL.DEVICE},
        "dataset": {"name": args.dataset, "query_images": len(split.query), "gallery_images": len(split.gallery),
                    **split.caption_stats()},
        "promptsg_text_tower_is_the_clip_files": same_tower(towers["promptsg"], towers["clip"]),
        "chance": split.chance(), "models": models,
        "image_words_vs_image": paired(models["promptsg"], "image_words", "image"),
        "image_other_words_vs_image": paired(models["promptsg"], "image_other_words", "image"),
        "example_prompts": {"words_only": models["promptsg"]["photo_prompt"]["example"],
                            "image_words": f"A photo of a s* person {split.words[split.q_pids[0]]}."},
        "seconds": {"passes": seconds, "total": round(time.time() - start, 1)},
    }
    text = table(results)
    pw, po = results["image_words_vs_image"], results["image_other_words_vs_image"]
    notes = (f"\nPromptSG image + its words vs image alone: mean AP change {pw['mean_ap_change']:+.2f} points, "
             f"{pw['queries_up']} queries up, {pw['queries_down']} down of {pw['queries']}; with another identity's "
             f"words: {po['mean_ap_change']:+.2f}, {po['queries_up']} up, {po['queries_down']} down. PromptSG's text "
             f"tower {'is' if results['promptsg_text_tower_is_the_clip_files'] else 'is NOT'} the CLIP file's, "
             f"tensor for tensor. {split.caption_stats()['identities_sharing_their_caption']} of "
             f"{len(split.pids)} test identities share their caption with another test identity.\n\n"
             f"`{results['command']}`; {date}, commit {rev}, {machine_words(record)}, "
             f"device {results['machine']['device']}; {results['seconds']['total']:.0f} s")
    print(text + "\n" + notes)
    paths = write_record(os.path.join(args.output, f"text_search_{date}_{rev}"), results, text + "\n" + notes)
    print("-> " + ", ".join(paths))
    return results


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
