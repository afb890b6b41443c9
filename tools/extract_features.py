#!/usr/bin/env python
"""Features of a trained model for any folder of person images, and a query-gallery search: new camera data.

    # the features of every image under the folders (.jpg .jpeg .png .bmp, recursive, sorted)
    python tools/extract_features.py --config-file projects/PromptSG/configs/Market1501/vit.yml \\
        --images /data/cam1 /data/cam2 --output feats/ MODEL.WEIGHTS logs/market1501/promptsg_vit/model_final.pth
    # and, for each query image, the closest of those images
    python tools/extract_features.py --config-file CFG --query /data/wanted --images /data/cam1 \\
        --output search/ --top-k 20 MODEL.WEIGHTS model.pth TEST.RERANK.ENABLED True
    # text-aware search: query images plus words (PromptSG) ...
    python tools/extract_features.py --config-file CFG --query /data/wanted --images /data/cam1 \\
        --text "carrying a red backpack" --output search/ MODEL.WEIGHTS model.pth \\
        MODEL.PROMPTSG.INFERENCE_PROMPT composed
    # ... or words alone (PromptSG or the CLIP baseline); --text-file: each query its own words
    python tools/extract_features.py --config-file CFG --images /data/cam1 --output search/ \\
        --text "in a red cap wearing a short-sleeved white shirt" MODEL.WEIGHTS model.pth

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

Text-aware search (--text WORDS, or --text-file FILE for one query's words each):
  * with --query (image and words): each query image's MIM query becomes the composed prompt with
    the words, "A photo of a s* person <words>." (s* its pseudo token), and its feature is ranked
    as above against the --images' usual features (the config's test prompt: use
    MODEL.PROMPTSG.INFERENCE_PROMPT composed for the gallery to match). Needs a PromptSG model with
    the inversion network and the MIM. Same files as a --query search; ``ranking.json`` also gives
    each query's prompt.
  * without --query (words only): the prompt "A photo of a person <words>." is embedded by CLIP's
    text tower and ranks the --images by cosine distance (1 - cosine, no AQE or re-ranking) to
    their CLIP image embeddings v, the space the SupCon loss aligns with prompts. Works for
    PromptSG and the CLIP baseline (whose checkpoint has no text tower: the frozen tower of its
    MODEL.CLIP.PRETRAINED file is used). Writes ``image_embeddings.npy`` (N, E) and ``images.txt``,
    ``text_embeddings.npy`` (Q, E) and ``texts.txt`` (the prompts), and ``ranking.json``.
  * --text-file: a JSON object. With --query, query image (its path, or its file name) -> words,
    for every query image; without --query, query name -> words, one words-only query each.
The words go into the prompt as given, so give what follows "person": "carrying a red backpack".
"""
import argparse
import os
import sys

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)

from promptsg.engine.checkpoint import NonFiniteError, check_finite_features, load_for_inference
from promptsg.inference import (check_text_search, embed_and_rank, list_images, ranking, text_queries,
                                write_features, write_ranking)
from promptsg.engine.preflight import InputError, load_checkpoint_config, sie_camera
from promptsg.analysis.text_search import ImageEmbeddings, WordsQueries, cosine_distances, text_tower
from promptsg.engine.trainer import Trainer


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
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", metavar="WORDS", default=None,
                      help='words for a text-aware search, e.g. "carrying a red backpack": with --query '
                           'added to each query image\'s prompt, without it a words-only search')
    text.add_argument("--text-file", metavar="FILE", default=None,
                      help="JSON object of per-query words: query image (path or file name) -> words "
                           "with --query, query name -> words without")
    parser.add_argument("--bf16", action="store_true",
                        help="run the model under bf16 autocast (faster on GPUs; FastReID's "
                             "evaluation, and this tool by default, run it in float32)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def setup(args):
    """The config and the camera index, checked before anything is built."""
    cfg = load_checkpoint_config(args.config_file, args.opts)
    camera = sie_camera(cfg, args.camera)
    cfg.TEST.ROC.ENABLED = False          # the images carry no identity labels
    cfg.freeze()
    return cfg, camera


def main(argv=None):
    args = parse_args(argv)
    cfg, camera = setup(args)
    if args.text is not None or args.text_file is not None:
        check_text_search(cfg, bool(args.query), args.config_file)
    gallery_paths = list_images(args.images, "--images")
    query_paths = list_images(args.query, "--query") if args.query else []
    text = text_queries(cfg, query_paths, args.text, args.text_file)
    os.makedirs(args.output, exist_ok=True)

    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    if text is not None and not query_paths:
        return words_only_main(args, cfg, model, text, gallery_paths, camera)
    searcher = model if text is None else WordsQueries(model, text.words)
    query, gallery, dist = embed_and_rank(cfg, searcher, query_paths, gallery_paths, camera, args.bf16)

    write_features(args.output, "", gallery, gallery_paths)
    summary = f"{len(gallery_paths)} images -> {args.output}/features.npy {gallery.shape}"
    if query_paths:
        write_features(args.output, "query_", query, query_paths)
        write_ranking(args.output, ranking(dist, query_paths, gallery_paths, args.top_k,
                                           None if text is None else text.prompts))
        how = cfg.TEST.METRIC + (", AQE" if cfg.TEST.AQE.ENABLED else "") + (
            ", re-ranking" if cfg.TEST.RERANK.ENABLED else "")
        if text is not None:
            how += f"; image and words against the gallery's {cfg.MODEL.PROMPTSG.INFERENCE_PROMPT}-prompt features"
        summary += f"; {len(query_paths)} queries ranked ({how}) -> {args.output}/ranking.json"
    print(summary)
    return query, gallery, dist


def words_only_main(args, cfg, model, text, gallery_paths, camera):
    """A words-only search: writes the embeddings and ranking.json; returns (texts, images, distances)."""
    texts = text_tower(model, cfg).embed_texts(text.prompts).cpu()
    check_finite_features(texts, "text embeddings")
    texts = texts.numpy()
    _, images, _ = embed_and_rank(cfg, ImageEmbeddings(model), [], gallery_paths, camera, args.bf16)
    dist = cosine_distances(texts, images)
    write_features(args.output, "", images, gallery_paths, ("image_embeddings.npy", "images.txt"))
    write_features(args.output, "", texts, text.prompts, ("text_embeddings.npy", "texts.txt"))
    write_ranking(args.output, ranking(dist, text.names, gallery_paths, args.top_k, text.prompts))
    queries = f"{len(text.names)} words-only quer{'y' if len(text.names) == 1 else 'ies'}"
    print(f"{len(gallery_paths)} images -> {args.output}/image_embeddings.npy {images.shape} (CLIP image "
          f"embeddings v); {queries} ranked (cosine to the CLIP text embedding of {text.prompts[0]!r}"
          f"{' ...' if len(text.prompts) > 1 else ''}) -> {args.output}/ranking.json")
    return texts, images, dist


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
