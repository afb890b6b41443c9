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

The graph (promptsg/export/onnx_export.py):
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
import torch
from tqdm import tqdm

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.engine import DefaultTrainer
from fastreid.evaluation import inference_on_dataset
from promptsg.export import onnx_export
from promptsg.engine.checkpoint import NonFiniteError, load_for_inference
from promptsg.engine.evaluation import ranked_distances
from promptsg.engine.preflight import InputError, check_datasets, check_output_dir, load_checkpoint_config


class ExportError(RuntimeError):
    """The model does not export to ONNX, or its graph disagrees with PyTorch."""


class WithProgress:
    """A test loader that shows a progress bar while FastReID's ``inference_on_dataset`` runs
    through it (that function reads only its length, its dataset and its batches)."""

    def __init__(self, loader, desc):
        self.loader, self.dataset, self.desc = loader, loader.dataset, desc

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(tqdm(self.loader, desc=self.desc, file=sys.stderr, leave=False))


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


def setup(args):
    """The config, the camera index and the test set, checked before anything is built."""
    opts = list(args.opts) + (["MODEL.WEIGHTS", args.weights] if args.weights else [])
    cfg = load_checkpoint_config(args.config_file, opts)
    cfg.MODEL.DEVICE = "cpu"              # the graph is traced on the CPU; ONNX has no device
    if "PROMPTSG" in cfg.MODEL:
        cfg.MODEL.PROMPTSG.COMPILE = ""   # torch.compile changes no result; the exporter traces eager code
    camera = None
    if "CLIP" in cfg.MODEL and cfg.MODEL.CLIP.SIE_CAMERA:
        cameras = cfg.MODEL.CLIP.NUM_CAMERAS
        if args.camera is None or not 0 <= args.camera < cameras:
            raise InputError(f"MODEL.CLIP.SIE_CAMERA is on: give --camera, a training camera index "
                             f"in 0..{cameras - 1} (got {args.camera})")
        if args.evaluate:
            raise InputError("--evaluate needs each test image's own camera; with MODEL.CLIP.SIE_CAMERA the "
                             "graph gives every image the --camera embedding")
        camera = args.camera
    check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output folder")
    dataset = None
    if args.evaluate:
        if not cfg.DATASETS.TESTS:
            raise InputError(f"{args.config_file}: DATASETS.TESTS is empty: --evaluate has no test set")
        dataset = cfg.DATASETS.TESTS[0]
        test_only = cfg.clone()
        test_only.DATASETS.NAMES, test_only.DATASETS.TESTS = (), (dataset,)   # no training data needed
        check_datasets(test_only, os.getenv("FASTREID_DATASETS", "datasets"))
    cfg.freeze()
    return cfg, camera, dataset


def export_checked(cfg, graph, output, check_batch):
    """Export ``graph`` to ``output`` once onnxruntime reproduces PyTorch on ``check_batch``
    images; returns (max abs difference, min cosine, feature width). Nothing is written when
    either fails."""
    tmp = output + ".tmp"
    try:
        try:
            onnx_export.export(graph, onnx_export.example_images(cfg, onnx_export.EXPORT_BATCH), tmp)
        except Exception as exc:  # the exporter's errors are many and long: keep their first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.BACKBONE.NAME}) does not export to "
                              f"ONNX: {type(exc).__name__}: {first}") from None
        agreement = check_agreement(cfg, graph, onnx_export.session(tmp), check_batch)
        os.replace(tmp, output)
    finally:
        onnx_export.remove_quietly(tmp)
    return agreement


def check_agreement(cfg, graph, sess, batch):
    """(max abs difference, min cosine, feature width) of the graph's features against PyTorch's
    on ``batch`` noise images; ExportError when a cosine is below onnx_export.MIN_COSINE."""
    images = onnx_export.example_images(cfg, batch, seed=1)
    with torch.no_grad():
        reference = graph(images).numpy()
    features = onnx_export.run(sess, images)
    if features.shape != reference.shape:
        raise ExportError(f"onnxruntime gives features of shape {features.shape}, PyTorch {reference.shape}; "
                          f"nothing written")
    difference, cosine = onnx_export.agreement(reference, features)
    if not cosine.min() >= onnx_export.MIN_COSINE:      # also refuses NaN
        raise ExportError(f"onnxruntime disagrees with PyTorch: min cosine {cosine.min():.6f} < "
                          f"{onnx_export.MIN_COSINE} over {batch} images (max abs difference {difference:.3g}); "
                          f"nothing written")
    return difference, float(cosine.min()), reference.shape[1]


def evaluate(cfg, graph, sess, dataset):
    """FastReID's evaluation on ``dataset`` of the PyTorch model (its own flip test) and of the
    graph (flip test inside it): {"pytorch": (metrics, ranked), "onnx": (metrics, ranked)},
    ``ranked`` holding the query-gallery distances the evaluator ranked."""
    runs = {}
    for name, model, flip_test in (("pytorch", graph.model, cfg.TEST.FLIP.ENABLED),
                                   ("onnx", onnx_export.OnnxFeatures(sess), False)):
        loader, evaluator = DefaultTrainer.build_evaluator(cfg, dataset)
        with ranked_distances() as ranked:
            metrics = inference_on_dataset(model, WithProgress(loader, f"{dataset}, {name}"), evaluator,
                                           flip_test=flip_test)
        runs[name] = (metrics, ranked)
    return runs


def same_rankings(dist_a, dist_b, top=None):
    """How many queries order their ``top`` closest gallery images (all with None) the same in
    both distance matrices (stable argsort)."""
    order_a = np.argsort(dist_a, axis=1, kind="stable")[:, :top]
    order_b = np.argsort(dist_b, axis=1, kind="stable")[:, :top]
    return int((order_a == order_b).all(axis=1).sum())


def describe(cfg, graph):
    """One line on what the graph holds of PromptSG's prompt."""
    model = graph.model
    if getattr(model, "text", None) is None or getattr(model.heads, "mim", None) is None:
        return "visual encoder only"
    if model.inference_prompt == "composed":
        return "composed prompt: inversion network and text encoder per image"
    return f"simplified prompt {cfg.MODEL.PROMPTSG.SIMPLE_PROMPT!r} folded in as a constant (no text encoder)"


def main(argv=None):
    args = parse_args(argv)
    cfg, camera, dataset = setup(args)
    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    graph = onnx_export.feature_graph(cfg, model, camera)
    print(f"exporting to {args.output} (from seconds for small models to about a minute for ViT-B/16 on two "
          f"CPU cores)", file=sys.stderr, flush=True)
    difference, cosine, dim = export_checked(cfg, graph, args.output, args.check_batch)

    height, width = cfg.INPUT.SIZE_TEST
    print(f"{args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB): images (batch, 3, {height}, {width}) "
          f"float32 RGB 0-255 -> features (batch, {dim}); {describe(cfg, graph)}"
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
    except (InputError, NonFiniteError, ExportError) as exc:
        sys.exit(f"error: {exc}")
