#!/usr/bin/env python
"""A faiss index of a gallery's features for deployment: built once, searched many times, extended.

    # embed every image under the folders once (exact search by default) into one file
    python tools/gallery_index.py build --config-file logs/market1501/promptsg_vit \\
        --images /data/cam1 /data/cam2 --index gallery_index.npz
    # an approximate index for millions of images: IVF (nprobe lists searched) or HNSW
    python tools/gallery_index.py build --config-file RUN --images /data/cams --index gallery_index.npz \\
        --factory IVF4096,Flat --params nprobe=16
    # new images (those already in the index are skipped), then a search
    python tools/gallery_index.py add --config-file RUN --images /data/cam3 --index gallery_index.npz
    python tools/gallery_index.py search --config-file RUN --index gallery_index.npz \\
        --query /data/wanted --output search/ --top-k 20

--config-file is a training run's OUTPUT_DIR (its config.yaml and model_final.pth) or a config
file with MODEL.WEIGHTS among the KEY VALUE overrides, as for tools/extract_features.py. Images
are embedded as that tool embeds them and ranked by the distance of TEST.METRIC ("cosine": inner
product of L2-normalised features, reported as 1 - cosine; "euclidean": squared L2), without
TEST.AQE and TEST.RERANK; with the default exact index (faiss "Flat") the ranking is
extract_features.py's. --factory takes any faiss index_factory string ("Flat", "IVF4096,Flat",
"HNSW32", "IVF4096,PQ64np"; approximate ones are trained on the images of `build`), --params
its search parameters ("nprobe=64", "efSearch=128"; `search` may override the saved ones). The
index runs on the GPU when faiss sees one and has the index type there (Flat, IVF).

The index file holds the faiss index, the images' absolute paths and the fingerprint of the
model that embedded them (its weights and the settings that change a feature); `add` and
`search` with another model are refused in one line naming both fingerprints. An image is known
by its resolved path: `add` skips images already in the index (also through a symbolic link) and
says how many. `build` and `add` hold a lock on the index file (FILE.lock): two at once run in
turn and lose nothing; `build` onto an existing index needs --overwrite. `search` writes
``ranking.json`` to --output (each query image's closest images with their distances, closest
first), as extract_features.py does. Python: ``run.build_index``, ``run.load_index``
(promptsg/gallery_index.py).
"""
import argparse
import os
import sys

import promptsg
from promptsg.engine.checkpoint import NonFiniteError
from promptsg.engine.preflight import InputError
from promptsg.gallery_index import add_to_file, build_file
from promptsg.inference import write_ranking


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed the --images into a new index file")
    add = commands.add_parser("add", help="embed the --images not in the index yet and add them")
    search = commands.add_parser("search", help="rank the index's images for each --query image")
    for sub in (build, add, search):
        sub.add_argument("--config-file", required=True, metavar="RUN_OR_FILE",
                         help="a training run's OUTPUT_DIR, or a config file (with MODEL.WEIGHTS)")
        sub.add_argument("--index", required=True, metavar="FILE", help="the index file")
        sub.add_argument("--camera", type=int, default=None,
                         help="camera index for models with SIE (MODEL.CLIP.SIE_CAMERA)")
    for sub in (build, add):
        sub.add_argument("--images", required=True, nargs="+", metavar="DIR", help="folders or images")
    build.add_argument("--factory", default="Flat", help="faiss index_factory string (default: Flat, exact)")
    build.add_argument("--params", default="", help='search parameters, e.g. "nprobe=16" or "efSearch=128"')
    build.add_argument("--overwrite", action="store_true", help="replace an index already at --index")
    search.add_argument("--params", default=None, help="search parameters instead of the index's own")
    search.add_argument("--query", required=True, nargs="+", metavar="DIR", help="folders or query images")
    search.add_argument("--output", required=True, metavar="DIR", help="where ranking.json goes")
    search.add_argument("--top-k", type=int, default=10, help="images per query in ranking.json")
    for sub in (build, add, search):
        sub.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.command == "search" and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = promptsg.load(args.config_file, opts=args.opts, camera=args.camera)
    if args.command == "build":
        index = build_file(run, args.index, args.images, args.factory, args.params, args.overwrite)
        print(f"{len(index)} images -> {args.index} ({args.factory}, {run.cfg.TEST.METRIC}; model fingerprint "
              f"{index.fingerprint.digest[:16]})")
        return index
    if args.command == "add":
        index, added, skipped = add_to_file(run, args.index, args.images)
        print(f"{len(added)} images added to {args.index} (now {len(index)}); {len(skipped)} already in it, skipped")
        return index
    index = run.load_index(args.index, args.params)
    hits = index.search(args.query, args.top_k)
    os.makedirs(args.output, exist_ok=True)
    write_ranking(args.output, hits)
    print(f"{len(hits)} queries ranked against the {len(index)} images of {args.index} -> {args.output}/ranking.json")
    return hits


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
