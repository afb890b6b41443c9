"""Why the simplified prompt scores below the composed one: a PromptSG checkpoint evaluated with
other MIM queries swapped in (tools/probe_simplified_gap.py).

The fixed queries between the simplified prompt's embedding l_simple and the mean composed prompt
of the training images l_mean, one training image's composed prompt, each image's own composed
prompt l_p, another identity's composed prompt, and, as a reference, l_p alone as the feature;
each scored by FastReID's test path and protocol with the run's own TEST settings.
"""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastreid.config import get_cfg
from fastreid.data.datasets import DATASET_REGISTRY

from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import build_dist

from ..config import add_promptsg_config
from ..engine.checkpoint import load_for_inference
from ..engine.embedding import embed_and_rank
from ..engine.preflight import InputError, check_weights, load_config
from ..modeling.diagnostics import mean_pairwise_cosine
from .text_search import cosine_distances
from ..engine.trainer import Trainer


def run_config(run_dir):
    """The run's config with its final checkpoint as MODEL.WEIGHTS; refuses a run this probe cannot read."""
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise InputError(f"{run_dir}: no config.yaml (give a training run directory)")
    cfg = load_config(add_promptsg_config(get_cfg()), config,
                      ["MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth")])
    check_weights(cfg, eval_only=True)
    p = cfg.MODEL.PROMPTSG
    if cfg.MODEL.META_ARCHITECTURE != "PromptSG" or not p.COMPOSE_TRAIN or p.MIM.CROSS_LAYERS < 1:
        raise InputError(f"{config}: not a PromptSG run with composed prompts and a MIM "
                         f"(this probe swaps the MIM's query)")
    if p.MIM.QUERY != "pooled":
        raise InputError(f"{config}: MODEL.PROMPTSG.MIM.QUERY is {p.MIM.QUERY!r}; this probe needs 'pooled' "
                         f"(one query vector per image)")
    if cfg.MODEL.CLIP.SIE_CAMERA:
        raise InputError(f"{config}: MODEL.CLIP.SIE_CAMERA is on; this probe embeds images without their camera")
    if cfg.TEST.AQE.ENABLED or cfg.TEST.RERANK.ENABLED:
        raise InputError(f"{config}: TEST.AQE / TEST.RERANK are on; this probe ranks by TEST.METRIC alone")
    cfg.TEST.ROC.ENABLED = False
    return cfg


class ComposedPrompts(nn.Module):
    """``model`` giving each image's composed-prompt embedding l_p = T("A photo of a s* person."),
    s* = f_theta(v), for FastReID's test loop."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        m = self.model
        visual = m.backbone(m.preprocess_image(batched_inputs), None, with_tokens=False)
        return m.prompt_features(visual, composed=True).text


def features_with_query(model, batched_inputs, query_of):
    """The retrieval features (B, D) of ``model`` whose MIM query (B, 1, E) is ``query_of(batched_inputs)``."""
    images = model.preprocess_image(batched_inputs)
    visual = model.encode_visual(images)
    query = query_of(batched_inputs).to(device=images.device, dtype=visual.tokens.dtype)
    return model.heads(visual, query.expand(len(images), 1, -1), 0)


class FixedQuery(nn.Module):
    """``model`` whose MIM query is one fixed embedding ``query`` (E,) for every image: the retrieval
    feature of the simplified prompt when ``query`` is its embedding, of any other fixed prompt else."""

    def __init__(self, model, query):
        super().__init__()
        self.model = model
        self.register_buffer("query", query.detach().reshape(1, 1, -1).clone())

    def forward(self, batched_inputs):
        return features_with_query(self.model, batched_inputs, lambda _: self.query)


class GivenQueries(nn.Module):
    """``model`` in FastReID's test loop, image i's MIM query ``queries[i]`` (N, E): the loop's target
    of each image is its position (``promptsg.engine.embedding.embed_and_rank``)."""

    def __init__(self, model, queries):
        super().__init__()
        self.model = model
        self.register_buffer("queries", torch.as_tensor(queries).detach().clone())

    def forward(self, batched_inputs):
        def own_query(inputs):
            return self.queries[torch.as_tensor(inputs["targets"], device=self.queries.device)][:, None, :]

        return features_with_query(self.model, batched_inputs, own_query)


def other_identity(pids, seed=0):
    """A permutation ``perm`` of range(len(pids)) with pids[perm[i]] != pids[i] for every i: each image
    is given the prompt of an image of another identity."""
    pids = np.asarray(pids)
    if len(set(pids.tolist())) < 2:
        raise ValueError("other_identity needs images of at least two identities")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pids))
    while True:
        same = np.flatnonzero(pids[perm] == pids)
        if not len(same):
            return perm
        for i in same:                        # swap with a random position; both sides must stay valid
            j = rng.integers(len(pids))
            if pids[perm[j]] != pids[i] and pids[perm[i]] != pids[j]:
                perm[i], perm[j] = perm[j], perm[i]


def mean_cosine(queries, prompts):
    """Mean over ``prompts`` (N, E) of the cosine to each row of ``queries`` (Q, E): (Q,) numpy."""
    q = F.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=-1)
    p = F.normalize(torch.as_tensor(prompts, dtype=torch.float32), dim=-1)
    return (q @ p.T).mean(dim=1).numpy()


def probe_run(run_dir, cfg, alphas, training_prompts, root):
    """Every row of the probe for one training run (``cfg``: its ``run_config``; the fixed queries
    between l_simple and l_mean at ``alphas``, ``training_prompts`` training images' prompts as the
    fixed query; datasets under ``root``): a dict with its rows, the prompts' geometry and how much
    of the gap the mean training prompt closes."""
    start = time.time()
    name = cfg.DATASETS.TESTS[0]
    dataset = DATASET_REGISTRY.get(name)(root=root)
    train_paths = [p for p, _, _ in dataset.train]
    query_paths, gallery_paths = [q[0] for q in dataset.query], [g[0] for g in dataset.gallery]
    q_pids, q_camids = np.array([q[1] for q in dataset.query]), np.array([q[2] for q in dataset.query])
    g_pids, g_camids = np.array([g[1] for g in dataset.gallery]), np.array([g[2] for g in dataset.gallery])

    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    model.eval()
    no_flip = cfg.clone()
    no_flip.TEST.FLIP.ENABLED = False        # a prompt per image, not averaged with its mirror image's

    def prompts(paths):
        return embed_and_rank(no_flip, ComposedPrompts(model), [], paths, 0)[1]

    train_prompts = prompts(train_paths)
    test_prompts = prompts(query_paths + gallery_paths)
    with torch.no_grad():
        l_simple = model.text.simple(1, model.device)[0].float().cpu()
    l_mean = torch.from_numpy(train_prompts).mean(dim=0)

    def rank(dist):
        cmc, all_ap, _ = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids)
        return {"mAP": 100 * float(np.mean(all_ap)), "Rank-1": 100 * float(cmc[0])}

    def evaluate(wrapper):
        q, g, _ = embed_and_rank(cfg, wrapper, query_paths, gallery_paths, 0)
        return rank(build_dist(torch.from_numpy(q), torch.from_numpy(g), cfg.TEST.METRIC))

    fixed = [("simplified", 0.0)] + [(f"between, a = {a:g}", a) for a in sorted(alphas) if 0 < a < 1] \
        + [("mean training prompt", 1.0)]
    rows = []
    for label, a in fixed:
        query = (1 - a) * l_simple + a * l_mean
        row = {"query": label, "alpha": a, **evaluate(FixedQuery(model, query)),
               "cos_to_training_prompts": float(mean_cosine(query[None], train_prompts)[0])}
        rows.append(row)
        print(f"{label:>22}: mAP {row['mAP']:.1f}  Rank-1 {row['Rank-1']:.1f}  "
              f"mean cos to the training prompts {row['cos_to_training_prompts']:.3f}", flush=True)
    # Fixed queries that are real composed prompts: those of a few training images, one at a time.
    picks = np.random.default_rng(0).choice(len(train_paths), size=training_prompts, replace=False)
    single = [evaluate(FixedQuery(model, torch.from_numpy(train_prompts[i]))) for i in picks]
    one_prompt = {"query": f"one training image's composed prompt (mean of {len(picks)} images)", "alpha": None,
                  "mAP": float(np.mean([r["mAP"] for r in single])),
                  "Rank-1": float(np.mean([r["Rank-1"] for r in single])),
                  "mAP_each": [r["mAP"] for r in single], "training_images": [train_paths[i] for i in picks],
                  "cos_to_training_prompts": float(mean_cosine(train_prompts[picks], train_prompts).mean())}
    model.inference_prompt = "composed"
    own = {"query": "own composed prompt (s* per image)", "alpha": None, **evaluate(model),
           "cos_to_training_prompts": float(mean_cosine(test_prompts, train_prompts).mean())}
    # Per-image prompts of the wrong person: each test image gets another identity's composed prompt.
    test_pids = np.concatenate([q_pids, g_pids])
    perm = other_identity(test_pids)
    shuffled = {"query": "another identity's composed prompt (per image)", "alpha": None,
                **evaluate(GivenQueries(model, torch.from_numpy(test_prompts[perm]))),
                "cos_to_training_prompts": own["cos_to_training_prompts"]}
    # The composed prompt alone as the retrieval feature (cosine): what s* tells about the person.
    nq = len(query_paths)
    prompt_only = {"query": "reference: the composed prompt l_p alone as the feature, no MIM", "alpha": None,
                   **rank(cosine_distances(test_prompts[:nq], test_prompts[nq:])),
                   "cos_to_training_prompts": own["cos_to_training_prompts"]}
    for row in (one_prompt, own, shuffled, prompt_only):
        rows.append(row)
        print(f"{row['query']}: mAP {row['mAP']:.1f}  Rank-1 {row['Rank-1']:.1f}  "
              f"mean cos to the training prompts {row['cos_to_training_prompts']:.3f}", flush=True)

    test_t = torch.from_numpy(test_prompts)
    geometry = {
        "cos_test_prompt_to_simplified": float(F.cosine_similarity(test_t, l_simple[None]).mean()),
        "cos_test_prompt_to_mean": float(F.cosine_similarity(test_t, l_mean[None]).mean()),
        "cos_simplified_to_mean": float(F.cosine_similarity(l_simple, l_mean, dim=0)),
        "mean_pairwise_cos_test_prompts": float(mean_pairwise_cosine(test_t)),
        "norm_simplified": float(l_simple.norm()), "norm_mean": float(l_mean.norm()),
        "mean_norm_test_prompts": float(test_t.norm(dim=1).mean()),
    }
    simplified, mean_row = rows[0], rows[len(fixed) - 1]
    gap = own["mAP"] - simplified["mAP"]
    closed = (mean_row["mAP"] - simplified["mAP"]) / gap if gap else float("nan")
    g = geometry
    print(f"{run_dir}: the mean training prompt closes {100 * closed:.0f}% of the simplified prompt's gap to the "
          f"composed one ({simplified['mAP']:.1f} -> {mean_row['mAP']:.1f}, composed {own['mAP']:.1f}); one "
          f"training image's prompt as the fixed query: {one_prompt['mAP']:.1f} (each: "
          f"{', '.join(f'{m:.1f}' for m in one_prompt['mAP_each'])}); another identity's prompt per image: "
          f"{shuffled['mAP']:.1f}; the composed prompt alone as the feature: {prompt_only['mAP']:.1f}. Test "
          f"images' composed prompts: cosine {g['cos_test_prompt_to_simplified']:.3f} to l_simple, "
          f"{g['cos_test_prompt_to_mean']:.3f} to l_mean, {g['mean_pairwise_cos_test_prompts']:.3f} to each other; "
          f"l_simple to l_mean {g['cos_simplified_to_mean']:.3f}. Norms: l_simple {g['norm_simplified']:.2f}, "
          f"l_mean {g['norm_mean']:.2f}, test prompts {g['mean_norm_test_prompts']:.2f}.", flush=True)
    return {"run": os.path.abspath(run_dir), "weights": os.path.abspath(cfg.MODEL.WEIGHTS),
            "device": cfg.MODEL.DEVICE,
            "dataset": {"name": name, "train_images": len(train_paths), "query_images": len(query_paths),
                        "gallery_images": len(gallery_paths)},
            "rows": rows, "geometry": geometry, "share_of_gap_closed_by_mean_prompt": closed,
            "seconds": round(time.time() - start, 1)}


def summarise(runs):
    """Per row label: mean and standard deviation over the runs of mAP, Rank-1 and the cosine."""
    summary = []
    for i, first in enumerate(runs[0]["rows"]):
        values = {k: np.array([run["rows"][i][k] for run in runs])
                  for k in ("mAP", "Rank-1", "cos_to_training_prompts")}
        summary.append({"query": first["query"], **{k: float(v.mean()) for k, v in values.items()},
                        **{f"{k}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}})
    return summary


def markdown(summary, runs):
    """The summary of ``runs`` runs as a markdown table (mean ± sd with several)."""
    spread = (lambda r, k: f" ± {r[k + '_std']:.1f}") if runs > 1 else (lambda r, k: "")  # noqa: E731
    over = f" ({runs} runs: mean ± sd)" if runs > 1 else ""
    lines = [f"| MIM query at test{over} | mAP | Rank-1 | mean cosine to the training images' composed prompts |",
             "|:--|--:|--:|--:|"]
    lines += [f"| {r['query']} | {r['mAP']:.1f}{spread(r, 'mAP')} | {r['Rank-1']:.1f}{spread(r, 'Rank-1')} | "
              f"{r['cos_to_training_prompts']:.3f} |" for r in summary]
    return "\n".join(lines)
