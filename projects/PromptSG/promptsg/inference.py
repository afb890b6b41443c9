"""Images of new camera data embedded exactly as the evaluation embeds a test set, and a search.

``embed_and_rank`` (``promptsg.engine.embedding``) runs FastReID's test path and returns the
distances FastReID's ``ReidEvaluator`` computes. This module reads image folders and text-aware
search queries with one-line errors, and writes features and rankings whole or not at all.
``tools/extract_features.py`` and ``promptsg.api`` are built on it.
"""
import contextlib
import json
import os
from typing import NamedTuple

import numpy as np
import open_clip

from .engine.embedding import embed_and_rank  # noqa: F401  (part of this module's interface)
from .modeling.heads import uses_inversion, uses_text_tower
from .engine.preflight import InputError, verify_image
from .modeling.prompt import prompt_tokens, with_words
from .analysis.text_search import composed_prompt_text, words_only_prompt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


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


def image_paths(source, what):
    """Image paths from a folder, a path, or a list of folders and paths (a folder's images sorted,
    recursive); each one decoded in full first, with one-line errors."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise InputError(f"{what}: no images given")
    paths = []
    for s in map(os.fspath, sources):
        if os.path.isdir(s):
            paths += list_images([s], what)
        elif os.path.isfile(s):
            verify_image(s)
            paths.append(s)
        else:
            raise InputError(f"{what}: no such file or folder: {s}")
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


def query_words(text, text_file, query_paths, text_flag="--text"):
    """(query names, their words): one entry per query image with --query (in query_paths' order),
    else one words-only query per --text / --text-file entry (``text``, or the JSON file ``text_file``). One-line errors for empty words and
    for --text-file entries that do not match the query images one to one."""
    if text is not None:
        entries, where = {text: text}, text_flag
    else:
        entries, where = read_text_file(text_file), f"--text-file {text_file}"
    for name, words in entries.items():
        if not words.strip().rstrip(".").strip():
            at = "" if text is not None else f" for {name!r}"
            raise InputError(f"{where}: the words{at} are empty: give what to add to the prompt, e.g. "
                             f'"carrying a red backpack"')
    if not query_paths:
        return list(entries), list(entries.values())
    if text is not None:
        return query_paths, [text] * len(query_paths)
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


# How a caller names the text-aware search's arguments in its errors: the command line's flags, or
# the Python API's Run.search(words=...).
TOOL_NAMES = {"text": "--text", "query": "with --query",
              "alone": "without --query, --text ranks the --images by the words alone against their CLIP image "
                       "embeddings"}
API_NAMES = {"text": "Run.search(words=...)", "query": "",
             "alone": "search without words=, or rank images by words alone with tools/extract_features.py --text"}


def check_text_search(cfg, with_query, config_file="the config", names=TOOL_NAMES):
    """What a text-aware search (with query images, or words only) needs of the model, from the
    config alone, before anything is built. ``names``: TOOL_NAMES or API_NAMES, for the errors."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch != "PromptSG":
        raise InputError(f"{names['text']} needs a CLIP model (MODEL.META_ARCHITECTURE PromptSG: PromptSG or the "
                         f"CLIP baseline); {config_file} builds {arch}")
    p = cfg.MODEL.PROMPTSG
    if with_query and not (uses_inversion(cfg) and p.MIM.CROSS_LAYERS > 0):
        lacks = " and ".join(what for what, missing in (
            ("no inversion network (MODEL.PROMPTSG.COMPOSE_TRAIN False, INFERENCE_PROMPT simplified)",
             not uses_inversion(cfg)), ("no MIM (MODEL.PROMPTSG.MIM.CROSS_LAYERS 0)", p.MIM.CROSS_LAYERS == 0))
            if missing)
        raise InputError(f"{' '.join(filter(None, (names['text'], names['query'])))} composes "
                         f'"A photo of a s* person <words>." for PromptSG\'s inversion network and MIM; this model '
                         f"has {lacks} (the CLIP baseline has neither): {names['alone']}")
    if not with_query and not uses_text_tower(cfg) and not cfg.MODEL.CLIP.PRETRAINED:
        raise InputError("--text: this model has no text tower of its own and MODEL.CLIP.PRETRAINED is empty: "
                         "give the CLIP file it was fine-tuned from (MODEL.CLIP.PRETRAINED FILE), whose frozen "
                         "text tower embeds the words")


class TextQueries(NamedTuple):
    """A text-aware search's queries: names (query images, or words-only query names), their words,
    and their prompts as text ("A photo of a s* person <words>." or "A photo of a person <words>.")."""
    names: list
    words: list
    prompts: list


def text_queries(cfg, query_paths, text=None, text_file=None, text_flag="--text"):
    """The checked TextQueries of --text / --text-file (None without them): every prompt must fit
    the text tower's context. ``text_flag``: how the caller names ``text`` in its errors."""
    if text is None and text_file is None:
        return None
    names, words = query_words(text, text_file, query_paths, text_flag)
    template = cfg.MODEL.PROMPTSG.PROMPT if query_paths else cfg.MODEL.PROMPTSG.SIMPLE_PROMPT
    tokenizer = open_clip.get_tokenizer(cfg.MODEL.CLIP.NAME)
    for w in dict.fromkeys(words):
        try:
            prompt_tokens(tokenizer, with_words(template, w))
        except ValueError as exc:
            raise InputError(f"{text_flag if text is not None else '--text-file'}: {exc}") from None
    prompts = [composed_prompt_text(cfg, w) if query_paths else words_only_prompt(cfg, w) for w in words]
    return TextQueries(names, words, prompts)


def write_atomic(path, write):
    """``write(file)`` into a temporary file beside ``path``, then renamed over it: a crash leaves
    no half-written file, and a failed write (a full disk) removes its temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
