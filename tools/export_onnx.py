#!/usr/bin/env python
"""A trained model as an ONNX graph of its retrieval feature, checked against PyTorch with onnxruntime.

    python tools/export_onnx.py --config-file projects/PromptSG/configs/Market1501/vit.yml \\
        --weights logs/market1501/promptsg_vit/model_final.pth --output promptsg_vit.onnx
    # MODEL.WEIGHTS works as in the other tools; --evaluate also scores the graph on the test set
    python tools/export_onnx.py --config-file CFG --output model.onnx --evaluate MODEL.WEIGHTS model.pth

Works for PromptSG (either test prompt, MODEL.PROMPTSG.INFERENCE_PROMPT), the CLIP baseline and
FastReID's own baselines where their layers export (the BoT, AGW, SBS and BoT-ViT configs of
configs/ do; a model that does not export stops the tool with one line naming the exporter's error). The checkpoint is loaded like ``train_net.py --eval-only``
loads it (promptsg.engine.checkpoint.load_for_inference: a checkpoint of another model is refused).

The graph (promptsg/export/onnx_export.py; the evaluation in promptsg/export/onnx_evaluation.py):
  * input ``images``: float32 (batch, 3, H, W), RGB in 0-255 at INPUT.SIZE_TEST, what FastReID's
    test transforms give (resize, then ``ToTensor`` without scaling); the normalisation by
    MODEL.PIXEL_MEAN / PIXEL_STD is inside the graph;
  * output ``features``: float32 (batch, D), the feature FastReID's evaluation ranks (the model's
    eval-mode output, averaged with the mirrored image's when TEST.FLIP.ENABLED);
  * the batch axis is dynamic. PromptSG's simplified prompt is a constant in the graph (no text
    encoder); the composed prompt runs the inversion network and the text encoder per image.
    Models with SIE (MODEL.CLIP.SIE_CAMERA) need ``--camera``: the training camera every image gets.

After export the graph runs in onnxruntime on a batch of ``--check-batch`` noise images (another
size than the export's, so the dynamic axis is exercised) beside PyTorch; the tool prints the
largest absolute difference and the smallest cosine similarity of the features and refuses the
graph, writing nothing, when a cosine is below 0.9999. ``--evaluate`` then runs FastReID's
evaluation on the first of DATASETS.TESTS twice, with the PyTorch model and with the graph, and
prints both mAP and Rank-1 and how many queries rank the gallery identically.

Writes --output (a single self-contained .onnx file, written whole or not at all). Bad input
(a missing config, checkpoint or dataset, an unwritable output folder) stops the tool in one
line before the model is built.
"""
import argparse
import os
import sys

import numpy as np

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)

from promptsg.engine.checkpoint import NonFiniteError, load_for_inference
from promptsg.engine.preflight import InputError
from promptsg.export import onnx_export
from promptsg.export.onnx_evaluation import evaluate, same_rankings
from promptsg.engine.trainer import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="the trained checkpoint (or MODEL.WEIGHTS FILE among the overrides)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--camera", type=int, default=None,
                        help="camera index for models with SIE (MODEL.CLIP.SIE_CAMERA)")
    parser.add_argument("--check-batch", type=int, default=3,
                        help="images in the onnxruntime-against-PyTorch check (default 3)")
    parser.add_argument("--evaluate", action="store_true",
                        help="also evaluate the PyTorch model and the graph on the first of DATASETS.TESTS")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.check_batch < 1:
        parser.error("--check-batch must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg, camera, dataset = onnx_export.export_config(args.config_file, args.opts, args.output, weights=args.weights,
                                                     camera=args.camera, evaluate=args.evaluate)
    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    graph = onnx_export.feature_graph(cfg, model, camera)
    print(f"exporting to {args.output} (from seconds for small models to about a minute for ViT-B/16 on two "
          f"CPU cores)", file=sys.stderr, flush=True)
    difference, cosine, dim = onnx_export.export_checked(cfg, graph, args.output, args.check_batch)

    height, width = cfg.INPUT.SIZE_TEST
    print(f"{args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB): images (batch, 3, {height}, {width}) "
          f"float32 RGB 0-255 -> features (batch, {dim}); {onnx_export.describe(cfg, graph)}"
          f"{'; flip test inside' if cfg.TEST.FLIP.ENABLED else ''}")
    print(f"onnxruntime against PyTorch on {args.check_batch} images: max abs difference {difference:.3g}, "
          f"min cosine {cosine:.7f}")
    if dataset is None:
        return {"difference": difference, "cosine": cosine}
    runs = evaluate(cfg, graph, onnx_export.session(args.output), dataset)
    (pt, pt_ranked), (ox, ox_ranked) = runs["pytorch"], runs["onnx"]
    dist_pt, dist_ox = pt_ranked["dist"], ox_ranked["dist"]
    print(f"FastReID evaluation on {dataset}: PyTorch mAP {pt['mAP']:.2f} Rank-1 {pt['Rank-1']:.2f}; "
          f"ONNX mAP {ox['mAP']:.2f} Rank-1 {ox['Rank-1']:.2f}; query-gallery distances differ by at most "
          f"{np.abs(dist_pt - dist_ox).max():.2g}; of {len(dist_pt)} queries, "
          f"{same_rankings(dist_pt, dist_ox, 10)} rank their top 10 identically, "
          f"{same_rankings(dist_pt, dist_ox)} the whole gallery")
    return {"difference": difference, "cosine": cosine, "runs": runs}


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError, onnx_export.ExportError) as exc:
        sys.exit(f"error: {exc}")
