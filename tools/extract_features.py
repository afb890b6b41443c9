#!/usr/bin/env python
"""Features of a trained model for any folder of person images, and a query-gallery search: new camera data.

    # the features of every image under the folders (.jpg .jpeg .png .bmp, recursive, sorted)
    python tools/extract_features.py --config-file projects/PromptSG/configs/Market1501/vit.yml \\
        --images /data/cam1 /data/cam2 --output feats/ MODEL.WEIGHTS logs/market1501/promptsg_vit/model_final.pth
    # and, for each query image, the closest of those images
    python tools/extract_features.py --config-file CFG --query /data/wanted --images /data/cam1 \\
        --output search/ --top-k 20 MODEL.WEIGHTS model.pth TEST.RERANK.ENABLED True

Works for every model tools/train_net.py trains (PromptSG with the config's test prompt, the CLIP
baseline, FastReID's own baselines). Images go through exactly what ``train_net.py --eval-only``
does with a test set: FastReID's test transforms, test loader and ``inference_on_dataset`` (flip
test when TEST.FLIP.ENABLED, float32 unless ``--bf16``), and the search ranks by the distances
FastReID's ReidEvaluator computes (TEST.METRIC, then TEST.AQE and TEST.RERANK when enabled). A missing folder, a folder
without images, a corrupt image or a missing checkpoint stops the tool with one line naming it,
before the model is built. Models with SIE (MODEL.CLIP.SIE_CAMERA) need ``--camera``: the
training-set camera index whose embedding the images get.

Writes to --output (each file written whole or not at all):
  * ``features.npy`` (N, D) float32, the model's features of the --images, one row per line of
    ``images.txt``; with --query also ``query_features.npy`` and ``query_images.txt``;
  * with --query, ``ranking.json``: for each query image its ``--top-k`` closest images with
    their distances, closest first.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.data.build import build_reid_test_loader
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.engine import DefaultTrainer
from fastreid.evaluation import DatasetEvaluator, ReidEvaluator, inference_on_dataset
from promptsg.checkpoint import NonFiniteError, check_finite_features, load_for_inference
from promptsg.evaluation import ranked_distances
from promptsg.preflight import InputError, load_checkpoint_config, verify_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR",
                        help="folders of images to embed (the gallery of a search)")
    parser.add_argument("--query", nargs="+", metavar="DIR", default=None,
                        help="folders of query images: rank the --images for each")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--top-k", type=int, default=10, help="images per query in ranking.json")
    parser.add_argument("--camera", type=int, default=None,
                        help="camera index for models with SIE (MODEL.CLIP.SIE_CAMERA)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the model under bf16 autocast (faster on GPUs; FastReID's "
                             "evaluation, and this tool by default, run it in float32)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def list_images(folders, flag):
    """The images under ``folders``, sorted; one-line errors for a missing folder or no images."""
    paths = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise InputError(f"{flag}: folder not found: {folder}")
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise InputError(f"{flag}: no {'/'.join(IMAGE_EXTENSIONS)} image under {folder}")
        paths += found
    for path in paths:
        verify_image(path)
    return paths


def setup(args):
    """The config and the camera index, checked before anything is built."""
    cfg = load_checkpoint_config(args.config_file, args.opts)
    camera = 0
    if "CLIP" in cfg.MODEL and cfg.MODEL.CLIP.SIE_CAMERA:
        cameras = cfg.MODEL.CLIP.NUM_CAMERAS
        if args.camera is None or not 0 <= args.camera < cameras:
            raise InputError(f"MODEL.CLIP.SIE_CAMERA is on: give --camera, a training camera index "
                             f"in 0..{cameras - 1} (got {args.camera})")
        camera = args.camera
    cfg.TEST.ROC.ENABLED = False          # the images carry no identity labels
    cfg.freeze()
    return cfg, camera


class KeptFeatures(DatasetEvaluator):
    """Keeps what ReidEvaluator is given: the model's features, as float32 on the CPU."""

    def __init__(self, ranker=None):
        self.ranker = ranker

    def reset(self):
        self.features = []
        if self.ranker is not None:
            self.ranker.reset()

    def process(self, inputs, outputs):
        self.features.append(outputs.to("cpu", torch.float32))
        if self.ranker is not None:
            self.ranker.process(inputs, outputs)

    def evaluate(self):
        return self.ranker.evaluate() if self.ranker is not None else {}


class BF16Autocast(torch.nn.Module):
    """``model`` run under bf16 autocast; what follows it (the distances) stays float32."""

    def __init__(self, model, device_type):
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(inputs)


def embed_and_rank(cfg, model, query_paths, gallery_paths, camera, bf16=False):
    """(query features, gallery features, query-gallery distances or None), by FastReID's test path;
    ``bf16``: the model runs under bf16 autocast, the features and distances stay float32."""
    items = [(path, 0, camera) for path in query_paths + gallery_paths]
    test_set = CommDataset(items, build_transforms(cfg, is_train=False), relabel=False)
    loader, num_query = build_reid_test_loader(cfg, test_set=test_set, num_query=len(query_paths))
    kept = KeptFeatures(ReidEvaluator(cfg, num_query) if query_paths else None)
    if bf16:
        model = BF16Autocast(model, torch.device(cfg.MODEL.DEVICE).type)
    with ranked_distances(rank=False) as ranked:
        inference_on_dataset(model, loader, kept, flip_test=cfg.TEST.FLIP.ENABLED)
    features = torch.cat(kept.features)
    check_finite_features(features)
    features = features.numpy()
    return features[:num_query], features[num_query:], ranked.get("dist")


def write_atomic(path, write):
    """``write(file)`` into ``path.tmp``, then renamed: a crash leaves no half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_features(output, prefix, features, paths):
    write_atomic(os.path.join(output, f"{prefix}features.npy"), lambda f: np.save(f, features))
    write_atomic(os.path.join(output, f"{prefix}images.txt"),
                 lambda f: f.write("".join(p + "\n" for p in paths).encode()))


def ranking(dist, query_paths, gallery_paths, top_k):
    """For each query, its ``top_k`` closest gallery images (stable order among equal distances)."""
    lists = []
    for q, path in enumerate(query_paths):
        order = np.argsort(dist[q], kind="stable")[:top_k]
        lists.append({"query": path, "top": [{"image": gallery_paths[g], "distance": float(dist[q, g])}
                                             for g in order]})
    return lists


def main(argv=None):
    args = parse_args(argv)
    cfg, camera = setup(args)
    gallery_paths = list_images(args.images, "--images")
    query_paths = list_images(args.query, "--query") if args.query else []
    os.makedirs(args.output, exist_ok=True)

    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    query, gallery, dist = embed_and_rank(cfg, model, query_paths, gallery_paths, camera, args.bf16)

    write_features(args.output, "", gallery, gallery_paths)
    summary = f"{len(gallery_paths)} images -> {args.output}/features.npy {gallery.shape}"
    if query_paths:
        write_features(args.output, "query_", query, query_paths)
        lists = ranking(dist, query_paths, gallery_paths, args.top_k)
        write_atomic(os.path.join(args.output, "ranking.json"),
                     lambda f: f.write(json.dumps(lists, indent=1).encode()))
        summary += (f"; {len(query_paths)} queries ranked ({cfg.TEST.METRIC}"
                    f"{', AQE' if cfg.TEST.AQE.ENABLED else ''}{', re-ranking' if cfg.TEST.RERANK.ENABLED else ''})"
                    f" -> {args.output}/ranking.json")
    print(summary)
    return query, gallery, dist


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
