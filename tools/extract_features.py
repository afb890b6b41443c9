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
import json
import os
import sys
from typing import NamedTuple

import numpy as np
import open_clip
import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.data.build import build_reid_test_loader
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.engine import DefaultTrainer
from fastreid.evaluation import DatasetEvaluator, ReidEvaluator, inference_on_dataset
from promptsg.checkpoint import NonFiniteError, check_finite_features, load_for_inference
from promptsg.evaluation import ranked_distances
from promptsg.heads import uses_inversion, uses_text_tower
from promptsg.preflight import InputError, load_checkpoint_config, verify_image
from promptsg.prompt import prompt_tokens, with_words
from promptsg.text_search import (ImageEmbeddings, WordsQueries, composed_prompt_text, cosine_distances,
                                  text_tower, words_only_prompt)

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


def read_text_file(path):
    """--text-file: a non-empty JSON object of names -> words."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except OSError as exc:
        raise InputError(f"--text-file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"--text-file: {path} is not JSON: {exc}") from None
    if not isinstance(entries, dict) or not entries or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise InputError(f"--text-file: {path} must hold a non-empty JSON object of names -> words (strings)")
    return entries


def query_words(args, query_paths):
    """(query names, their words): one entry per query image with --query (in query_paths' order),
    else one words-only query per --text / --text-file entry. One-line errors for empty words and
    for --text-file entries that do not match the query images one to one."""
    if args.text is not None:
        entries, where = {args.text: args.text}, "--text"
    else:
        entries, where = read_text_file(args.text_file), f"--text-file {args.text_file}"
    for name, words in entries.items():
        if not words.strip().rstrip(".").strip():
            at = "" if args.text is not None else f" for {name!r}"
            raise InputError(f"{where}: the words{at} are empty: give what to add to the prompt, e.g. "
                             f'"carrying a red backpack"')
    if not query_paths:
        return list(entries), list(entries.values())
    if args.text is not None:
        return query_paths, [args.text] * len(query_paths)
    # Keys name a query image by its path or, when unique among the queries, by its file name.
    by_key = {}
    for path in query_paths:
        by_key[path] = by_key[os.path.abspath(path)] = path
        name = os.path.basename(path)
        by_key[name] = None if name in by_key else path
    words = {}
    for key, value in entries.items():
        path = by_key.get(key, by_key.get(os.path.abspath(key), "unknown"))
        if path == "unknown":
            raise InputError(f"{where}: {key!r} is none of the --query images")
        if path is None:
            raise InputError(f"{where}: several --query images are named {key!r}: give its path")
        words[path] = value
    missing = [p for p in query_paths if p not in words]
    if missing:
        raise InputError(f"{where}: no words for {len(missing)} of the {len(query_paths)} --query images "
                         f"(first: {missing[0]})")
    return query_paths, [words[p] for p in query_paths]


def check_text_search(cfg, args):
    """What a text-aware search needs of the model, from the config alone, before anything is built."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch != "PromptSG":
        raise InputError(f"--text needs a CLIP model (MODEL.META_ARCHITECTURE PromptSG: PromptSG or the CLIP "
                         f"baseline); {args.config_file} builds {arch}")
    p = cfg.MODEL.PROMPTSG
    if args.query and not (uses_inversion(cfg) and p.MIM.CROSS_LAYERS > 0):
        lacks = " and ".join(what for what, missing in (
            ("no inversion network (MODEL.PROMPTSG.COMPOSE_TRAIN False, INFERENCE_PROMPT simplified)",
             not uses_inversion(cfg)), ("no MIM (MODEL.PROMPTSG.MIM.CROSS_LAYERS 0)", p.MIM.CROSS_LAYERS == 0))
            if missing)
        raise InputError(f'--text with --query composes "A photo of a s* person <words>." for PromptSG\'s '
                         f"inversion network and MIM; this model has {lacks} (the CLIP baseline has neither): "
                         f"without --query, --text ranks the --images by the words alone against their CLIP "
                         f"image embeddings")
    if not args.query and not uses_text_tower(cfg) and not cfg.MODEL.CLIP.PRETRAINED:
        raise InputError("--text: this model has no text tower of its own and MODEL.CLIP.PRETRAINED is empty: "
                         "give the CLIP file it was fine-tuned from (MODEL.CLIP.PRETRAINED FILE), whose frozen "
                         "text tower embeds the words")


class TextQueries(NamedTuple):
    """A text-aware search's queries: names (query images, or words-only query names), their words,
    and their prompts as text ("A photo of a s* person <words>." or "A photo of a person <words>.")."""
    names: list
    words: list
    prompts: list


def text_queries(args, cfg, query_paths):
    """The checked TextQueries of --text / --text-file (None without them): every prompt must fit
    the text tower's context."""
    if args.text is None and args.text_file is None:
        return None
    names, words = query_words(args, query_paths)
    template = cfg.MODEL.PROMPTSG.PROMPT if query_paths else cfg.MODEL.PROMPTSG.SIMPLE_PROMPT
    tokenizer = open_clip.get_tokenizer(cfg.MODEL.CLIP.NAME)
    for w in dict.fromkeys(words):
        try:
            prompt_tokens(tokenizer, with_words(template, w))
        except ValueError as exc:
            raise InputError(f"--text: {exc}") from None
    prompts = [composed_prompt_text(cfg, w) if query_paths else words_only_prompt(cfg, w) for w in words]
    return TextQueries(names, words, prompts)


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
    ``bf16``: the model runs under bf16 autocast, the features and distances stay float32. Each
    image's target is its position (queries first), which ``WordsQueries`` reads."""
    items = [(path, i, camera) for i, path in enumerate(query_paths + gallery_paths)]
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


def write_features(output, prefix, features, paths, names=("features.npy", "images.txt")):
    write_atomic(os.path.join(output, prefix + names[0]), lambda f: np.save(f, features))
    write_atomic(os.path.join(output, prefix + names[1]),
                 lambda f: f.write("".join(p + "\n" for p in paths).encode()))


def ranking(dist, query_paths, gallery_paths, top_k, prompts=None):
    """For each query, its ``top_k`` closest gallery images (stable order among equal distances);
    with ``prompts``, each query's prompt too."""
    lists = []
    for q, path in enumerate(query_paths):
        order = np.argsort(dist[q], kind="stable")[:top_k]
        entry = {"query": path} if prompts is None else {"query": path, "prompt": prompts[q]}
        entry["top"] = [{"image": gallery_paths[g], "distance": float(dist[q, g])} for g in order]
        lists.append(entry)
    return lists


def write_ranking(output, lists):
    write_atomic(os.path.join(output, "ranking.json"), lambda f: f.write(json.dumps(lists, indent=1).encode()))


def main(argv=None):
    args = parse_args(argv)
    cfg, camera = setup(args)
    if args.text is not None or args.text_file is not None:
        check_text_search(cfg, args)
    gallery_paths = list_images(args.images, "--images")
    query_paths = list_images(args.query, "--query") if args.query else []
    text = text_queries(args, cfg, query_paths)
    os.makedirs(args.output, exist_ok=True)

    model = DefaultTrainer.build_model(cfg)
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
