"""Text-aware search measured on a SyntheticMarket test split with the generator's own captions
(tools/evaluate_text_search.py): words-only queries against the gallery's image embeddings v, and
query images with their words against the gallery's features, beside the image alone, another
identity's words and chance (``promptsg.engine.evaluation.chance_level``).
"""
import os

import numpy as np
import torch

from fastreid.config import get_cfg
from fastreid.data.datasets import DATASET_REGISTRY

from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import build_dist

from ..config import add_promptsg_config
from ..data.synthetic import identity_captions, person_words
from ..engine.checkpoint import load_for_inference
from ..engine.embedding import embed_and_rank
from ..engine.evaluation import chance_level
from ..engine.preflight import InputError, check_weights, load_config
from .text_search import ImageEmbeddings, WordsQueries, cosine_distances, text_tower, words_only_prompt
from ..engine.trainer import Trainer

NO_CAMERA = -1          # words-only queries: a camera no gallery image has, so none is left out


def run_config(flag, run_dir, clip_file, weights=True):
    """The run's config with its final checkpoint (or none: ``weights=False``), the CLIP file given."""
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise InputError(f"{flag} {run_dir}: no config.yaml (give a training run directory)")
    opts = ["MODEL.CLIP.PRETRAINED", clip_file,
            "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth") if weights else ""]
    cfg = load_config(add_promptsg_config(get_cfg()), config, opts)
    if weights:
        check_weights(cfg, eval_only=True)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.TEST.ROC.ENABLED = False
    return cfg


def run_configs(promptsg, baseline, clip_file):
    """The configs of the three models: "promptsg" and "clip_baseline" (the runs ``promptsg`` and
    ``baseline`` with their checkpoints), "clip_zero_shot" (the baseline's config, no checkpoint),
    each with the CLIP file ``clip_file``; one-line InputError for a run this benchmark cannot read."""
    if not os.path.isfile(clip_file):
        raise InputError(f"--clip: file not found: {clip_file}")
    cfgs = {"promptsg": run_config("--promptsg", promptsg, clip_file),
            "clip_baseline": run_config("--baseline", baseline, clip_file),
            "clip_zero_shot": run_config("--baseline", baseline, clip_file, weights=False)}
    if cfgs["clip_zero_shot"].MODEL.PROMPTSG.MIM.CROSS_LAYERS or cfgs["clip_zero_shot"].MODEL.PROMPTSG.COMPOSE_TRAIN:
        raise InputError(f"--baseline {baseline}: not a CLIP baseline run (it has a MIM or composes s*)")
    if cfgs["promptsg"].TEST.AQE.ENABLED or cfgs["promptsg"].TEST.RERANK.ENABLED:
        raise InputError(f"--promptsg {promptsg}: TEST.AQE / TEST.RERANK are on; this benchmark ranks by "
                         f"TEST.METRIC alone")
    return cfgs


def build(cfg, prompt=None):
    """The model of ``cfg`` (its checkpoint loaded when MODEL.WEIGHTS is set), in eval mode."""
    if prompt is not None:
        cfg = cfg.clone()
        cfg.MODEL.PROMPTSG.INFERENCE_PROMPT = prompt
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_for_inference(model, cfg.MODEL.WEIGHTS)
    return model.eval(), cfg


def embed(cfg, model, paths):
    """Features of ``paths`` by FastReID's test path (``embed_and_rank``). Each image's target
    is its position, so ``WordsQueries(model, words)`` gives image i the words ``words[i]``."""
    return embed_and_rank(cfg, model, [], paths, 0)[1]


def metrics(dist, q_pids, g_pids, q_camids, g_camids):
    """mAP and Rank-1 (%) by FastReID's evaluate_rank, and each query's AP."""
    cmc, all_ap, _ = evaluate_rank(dist, np.asarray(q_pids), np.asarray(g_pids), np.asarray(q_camids),
                                   np.asarray(g_camids))
    return {"mAP": 100 * float(np.mean(all_ap)), "Rank-1": 100 * float(cmc[0]), "ap": [float(a) for a in all_ap]}


class EvaluationSplit:
    """Query and gallery images of the test set, each test identity's words, and the controls' words."""

    def __init__(self, name, root):
        dataset = DATASET_REGISTRY.get(name)(root=root)
        self.query, self.gallery = dataset.query, dataset.gallery
        self.query_paths = [p for p, _, _ in self.query]
        self.gallery_paths = [p for p, _, _ in self.gallery]
        self.q_pids, self.q_camids = [q[1] for q in self.query], [q[2] for q in self.query]
        self.g_pids, self.g_camids = [g[1] for g in self.gallery], [g[2] for g in self.gallery]
        captions = identity_captions(dataset.dataset_dir)
        self.pids = sorted(set(self.q_pids))
        self.captions = {pid: captions[pid] for pid in self.pids}
        self.words = {pid: person_words(c) for pid, c in self.captions.items()}
        # The control: the next test identity (by pid, cyclic) whose caption differs.
        self.other_words = {}
        for i, pid in enumerate(self.pids):
            others = self.pids[i + 1:] + self.pids[:i]
            self.other_words[pid] = self.words[next(p for p in others if self.captions[p] != self.captions[pid])]

    def caption_stats(self):
        distinct = set(self.captions.values())
        shared = sum(1 for c in self.captions.values() if list(self.captions.values()).count(c) > 1)
        return {"identities": len(self.pids), "distinct_captions": len(distinct),
                "identities_sharing_their_caption": shared}

    def words_only(self, dist):
        return metrics(dist, self.pids, self.g_pids, [NO_CAMERA] * len(self.pids), self.g_camids)

    def image_queries(self, dist):
        return metrics(dist, self.q_pids, self.g_pids, self.q_camids, self.g_camids)

    def chance(self):
        words = chance_level(self.pids, [NO_CAMERA] * len(self.pids), self.g_pids, self.g_camids)
        image = chance_level(self.q_pids, self.q_camids, self.g_pids, self.g_camids)
        return {"words_only": {"mAP": 100 * words[0], "Rank-1": 100 * words[1]},
                "image_queries": {"mAP": 100 * image[0], "Rank-1": 100 * image[1]}}


def words_only_rows(split, cfg, model, v):
    """Words-only search with ``model``'s text tower against the gallery embeddings ``v``."""
    tower = text_tower(model, cfg)
    rows = {}
    for form, prompts in (("photo_prompt", [words_only_prompt(cfg, split.words[p]) for p in split.pids]),
                          ("bare_caption", [split.captions[p] for p in split.pids])):
        texts = tower.embed_texts(prompts).cpu().numpy()
        rows[form] = {"example": prompts[0], **split.words_only(cosine_distances(texts, v))}
    return rows, tower


def evaluate_promptsg(split, cfg, progress):
    """Words only against v; the image alone, with its words and with another identity's words
    against the composed-prompt gallery; the image alone and with its words against the
    simplified-prompt gallery (the test prompt of the paper's recipe)."""
    model, composed_cfg = build(cfg, "composed")
    simplified, simplified_cfg = build(cfg, "simplified")
    words = [split.words[pid] for pid in split.q_pids]
    other = [split.other_words[pid] for pid in split.q_pids]
    steps = {
        "gallery_v": lambda: embed(cfg, ImageEmbeddings(model), split.gallery_paths),
        "gallery": lambda: embed(composed_cfg, model, split.gallery_paths),
        "image": lambda: embed(composed_cfg, model, split.query_paths),
        "image_words": lambda: embed(composed_cfg, WordsQueries(model, words), split.query_paths),
        "image_other_words": lambda: embed(composed_cfg, WordsQueries(model, other), split.query_paths),
        "gallery_simplified": lambda: embed(simplified_cfg, simplified, split.gallery_paths),
        "image_simplified": lambda: embed(simplified_cfg, simplified, split.query_paths),
    }
    feats = {name: progress(f"PromptSG: {name}", step) for name, step in steps.items()}
    rows, tower = words_only_rows(split, cfg, model, feats["gallery_v"])
    metric = composed_cfg.TEST.METRIC
    for name, query, gallery in (("image", "image", "gallery"), ("image_words", "image_words", "gallery"),
                                 ("image_other_words", "image_other_words", "gallery"),
                                 ("image_simplified", "image_simplified", "gallery_simplified"),
                                 ("image_words_simplified_gallery", "image_words", "gallery_simplified")):
        rows[name] = split.image_queries(build_dist(torch.from_numpy(feats[query]), torch.from_numpy(feats[gallery]),
                                                    metric))
    return rows, {k: v.detach().cpu().clone() for k, v in tower.state_dict().items()}


def evaluate_clip(split, cfg, name, progress):
    """Words only against v, and v image-to-image, for a model without an inversion network."""
    model, _ = build(cfg)
    gallery_v = progress(f"{name}: gallery_v", lambda: embed(cfg, ImageEmbeddings(model), split.gallery_paths))
    query_v = progress(f"{name}: query_v", lambda: embed(cfg, ImageEmbeddings(model), split.query_paths))
    rows, tower = words_only_rows(split, cfg, model, gallery_v)
    rows["image_v"] = split.image_queries(cosine_distances(query_v, gallery_v))
    return rows, {k: v.detach().cpu().clone() for k, v in tower.state_dict().items()}


def paired(rows, a, b):
    """How the per-query AP of rows[a] compares with rows[b]'s."""
    ap_a, ap_b = np.array(rows[a]["ap"]), np.array(rows[b]["ap"])
    return {"mean_ap_change": 100 * float(np.mean(ap_a - ap_b)), "queries_up": int(np.sum(ap_a > ap_b + 1e-9)),
            "queries_down": int(np.sum(ap_a < ap_b - 1e-9)), "queries": len(ap_a)}


def same_tower(a, b):
    """Whether two state dicts hold the same tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def table(results):
    """The markdown table of ``results``."""
    chance, models = results["chance"], results["models"]
    fmt = lambda row: f"{row['mAP']:.1f} | {row['Rank-1']:.1f}"  # noqa: E731
    lines = ["| Model | Query | mAP | Rank-1 |", "|:--|:--|--:|--:|",
             f"| Chance (random ranking) | words only (100 identities) | {fmt(chance['words_only'])} |",
             f"| Chance (random ranking) | image (Market protocol) | {fmt(chance['image_queries'])} |"]
    labels = {"clip_zero_shot": "Pretrained small CLIP, zero-shot", "promptsg": "PromptSG",
              "clip_baseline": "CLIP baseline"}
    queries = {"photo_prompt": 'words only, "A photo of a person <words>." vs v',
               "bare_caption": 'words only, the bare caption ("a person <words>.") vs v',
               "image_v": "image only, v vs v (Market protocol)",
               "image": "image only, composed prompt (Market protocol)",
               "image_words": 'image + its words, "A photo of a s* person <words>."',
               "image_other_words": "image + another identity's words (control)",
               "image_simplified": "image only, simplified prompt (query and gallery)",
               "image_words_simplified_gallery": "image + its words, against the simplified-prompt gallery"}
    for key, rows in models.items():
        for row, label in queries.items():
            if row in rows:
                lines.append(f"| {labels[key]} | {label} | {fmt(rows[row])} |")
        if key != "promptsg":
            lines.append(f"| {labels[key]} | image + words | n/a: no inversion network (s*) and no MIM |")
    return "\n".join(lines)
