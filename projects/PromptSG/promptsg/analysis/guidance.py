"""Whether the prompt guides a trained PromptSG at test (tools/run_ablations.py --guidance): the
ranking with each test prompt and with the controls, where the simplified prompt looks, and
search with words, on a SyntheticMarket test split.

For one run, by FastReID's test path and protocol (``embed_and_rank``, ``evaluate_rank``):
  * ``simplified``, ``composed``: mAP / Rank-1 with "A photo of a person." and with each image's
    own "A photo of a s* person.";
  * ``other_identity``: every test image's MIM query is the composed prompt of an image of another
    identity (``simplified_gap.other_identity``): a prompt that reaches the ranking lowers the mAP;
  * ``no_person``: every image's MIM query is the embedding of ``NO_PERSON_PROMPT``;
  * ``own_words``, ``other_words``: the query images' MIM query is "A photo of a s* person <words>."
    with their identity's generator words, or another identity's, against the composed-prompt
    gallery (``text_search_evaluation``); ``composed`` is the image alone;
  * ``attention_share``: the simplified prompt's map over the patches (the weights the forward
    uses, head mean), its mass inside the person (``attention_shares``), mean over the test images
    with a person; with a baseline run, the baseline's last-block CLS attention share on the same
    images (``baseline_last_block_share``);
  * ``read_share``: where the feature looks, the prompt's map and the content together: v's
    attention over the patches in the MIM's last block under the simplified prompt's bias (head
    mean, renormalised over the patches as the baseline's last block is), its mass inside the person.
"""
import json
import os

import torch

from fastreid.config import get_cfg
from fastreid.utils.compute_dist import build_dist

from ..config import add_promptsg_config
from ..engine.embedding import embed_and_rank
from ..engine.preflight import check_weights, load_config
from .attention_inputs import build_model
from .attention_maps import compute_maps, head_mean, mask_at_input, mask_share, patch_coverage, patch_grid
from .attention_shares import person_masks
from .simplified_gap import ComposedPrompts, FixedQuery, GivenQueries, other_identity, run_config
from .text_search import WordsQueries
from .text_search_evaluation import EvaluationSplit

NO_PERSON_PROMPT = "A photo of a car."
FILE_NAME = "guidance.json"


class PromptGuidance:
    """The measurements of ``measure`` on one test split under ``root``; the person masks are
    rendered once and kept for every run measured with this object."""

    def __init__(self, root):
        self.root = root
        self.splits, self.masks = {}, {}

    def split(self, name):
        if name not in self.splits:
            self.splits[name] = EvaluationSplit(name, self.root)
        return self.splits[name]

    def person_masks(self, paths):
        missing = [p for p in paths if p not in self.masks]
        self.masks.update(zip(missing, person_masks(missing)))
        return [self.masks[p] for p in paths]

    def measure(self, run_dir, baseline_dir=None):
        """Every measurement of the module docstring for the PromptSG run ``run_dir`` (a training
        run with composed prompts and a MIM), with the baseline run ``baseline_dir`` for its
        last-block attention; kept in ``run_dir/guidance.json`` and read back from there."""
        path = os.path.join(run_dir, FILE_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        cfg = run_config(run_dir)
        split = self.split(cfg.DATASETS.TESTS[0])
        model = build_model(cfg)
        out = test_prompt_rankings(cfg, model, split)
        out.update(self.attention_shares(cfg, model, baseline_dir, split.query_paths + split.gallery_paths, split))
        out["no_person_prompt"] = NO_PERSON_PROMPT
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        return out

    def attention_shares(self, cfg, model, baseline_dir, paths, split):
        """Mean share inside the person of the simplified prompt's map (and of the baseline's last
        block) over the images of ``paths`` with a person."""
        items = [(p, c) for p, c in zip(paths, split.q_camids + split.g_camids)]
        masks = self.person_masks(paths)
        models = [(cfg, model, "promptsg", {"attention_share": "simplified", "read_share": "promptsg_read"})]
        if baseline_dir:
            base_cfg = run_config_baseline(baseline_dir)
            models.append((base_cfg, build_model(base_cfg), "baseline", {"baseline_last_block_share": "baseline_last_block"}))
        out = {}
        for c, m, kind, keys in models:
            maps, grid = compute_maps(c, m, items, kind)[0], patch_grid(m.backbone)
            for key, name in keys.items():
                if name not in maps:
                    continue
                values = [mask_share(head_mean(maps[name][i]), patch_coverage(mask_at_input(mask, c), grid)).item()
                          for i, mask in enumerate(masks) if mask is not None]
                out[key] = sum(values) / len(values)
        out["images_with_person"] = sum(mask is not None for mask in masks)
        return out


def test_prompt_rankings(cfg, model, split):
    """mAP / Rank-1 of ``model`` (a PromptSG with f_theta and a MIM, in eval mode) on ``split``
    (an ``EvaluationSplit``) with each MIM query of the module docstring: "simplified", "composed",
    "other_identity", "no_person", "own_words", "other_words"."""
    queries, gallery = split.query_paths, split.gallery_paths
    nq = len(queries)

    def features(wrapper, paths):
        return torch.from_numpy(embed_and_rank(cfg, wrapper, [], paths, 0)[1])

    def ranked(q, g):
        row = split.image_queries(build_dist(q, g, cfg.TEST.METRIC))
        return {"mAP": row["mAP"], "Rank-1": row["Rank-1"]}

    out, prompt = {}, model.inference_prompt
    try:
        model.inference_prompt = "simplified"
        both = features(model, queries + gallery)
        out["simplified"] = ranked(both[:nq], both[nq:])
        model.inference_prompt = "composed"
        composed = features(model, queries + gallery)
        out["composed"] = ranked(composed[:nq], composed[nq:])
    finally:
        model.inference_prompt = prompt
    no_flip = cfg.clone()
    no_flip.TEST.FLIP.ENABLED = False           # one prompt per image, as the probe composes it
    prompts = torch.from_numpy(embed_and_rank(no_flip, ComposedPrompts(model), [], queries + gallery, 0)[1])
    perm = other_identity(split.q_pids + split.g_pids)
    shuffled = features(GivenQueries(model, prompts[perm]), queries + gallery)
    out["other_identity"] = ranked(shuffled[:nq], shuffled[nq:])
    car = model.text.embed_texts([NO_PERSON_PROMPT])[0].cpu()
    fixed = features(FixedQuery(model, car), queries + gallery)
    out["no_person"] = ranked(fixed[:nq], fixed[nq:])
    for name, words in (("own_words", split.words), ("other_words", split.other_words)):
        with_words = features(WordsQueries(model, [words[pid] for pid in split.q_pids]), queries)
        out[name] = ranked(with_words, composed[nq:])
    return out


def run_config_baseline(run_dir):
    """The CLIP baseline run's config with its final checkpoint."""
    cfg = load_config(add_promptsg_config(get_cfg()), os.path.join(run_dir, "config.yaml"),
                      ["MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth")])
    check_weights(cfg, eval_only=True)
    return cfg


def guidance_figures(measured):
    """The figures the targets read, from one run's ``measure``: mAP differences (points) and the
    attention shares."""
    m = {k: v["mAP"] for k, v in measured.items() if isinstance(v, dict)}
    out = {"simplified_mAP": m["simplified"], "composed_minus_simplified": m["composed"] - m["simplified"],
           "other_identity_drop": m["composed"] - m["other_identity"],
           "no_person_change": m["no_person"] - m["simplified"],
           "own_words_change": m["own_words"] - m["composed"],
           "other_words_change": m["other_words"] - m["composed"],
           "attention_share": measured["attention_share"]}
    if "read_share" in measured:
        out["read_share"] = measured["read_share"]
    if "baseline_last_block_share" in measured:
        out["baseline_last_block_share"] = measured["baseline_last_block_share"]
        out["attention_margin"] = measured["attention_share"] - measured["baseline_last_block_share"]
    return out
