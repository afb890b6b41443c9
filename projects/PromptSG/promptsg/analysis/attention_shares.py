"""How much of each attention map lies inside the person, over a list of images: per image the
map's share inside the person mask (``mask_share``) and its spread, and over the images with a
person the mean share against chance (a uniform map's share) and, paired, against the baseline's
maps with a bootstrap interval. The masks are those a generated SyntheticMarket knows
(``promptsg.data.PersonMasks``)."""
import os

import numpy as np
import torch
from tabulate import tabulate

from ..data.synthetic import MANIFEST_NAME, PersonMasks
from .attention_maps import head_mean, mask_share

# Map name -> row label in the figure and the table.
LABELS = {"baseline": "CLIP baseline (CLS rollout)",
          "simplified": 'PromptSG MIM, "A photo of a person"',
          "composed": 'PromptSG MIM, "A photo of a s* person"',
          "baseline_last_block": "CLIP baseline (last block's CLS attention)",
          "promptsg_rollout": "PromptSG's visual encoder (CLS rollout)",
          "promptsg_last_block": "PromptSG's visual encoder (last block's CLS attention)",
          "promptsg_read": "PromptSG MIM, v's attention in its last block under the simplified prompt's map"}


DEFINITIONS = {
    "share": "sum over the patches of the map's weight times the fraction of the patch inside the person "
             "mask (the mask brought to the model's input size); maps sum to one over the patches",
    "chance": "the share of a uniform map: the mean fraction of a patch inside the person",
    "mean_share, std_share, median_share, chance": "over the images with a person (background crops left out)",
    "against": "paired with the same image's baseline map: images_above, the fraction of images where this "
               "map's share is larger; mean_difference of the shares with a 95% bootstrap interval (2000 draws)",
    "median_effective_patches": "exp(entropy) of the map, median over all images: the patches it spreads over",
    "PromptSG MIM maps": "cross-attention of the first MIM block (query: the prompt embedding), mean over heads",
    "CLS rollout": "Abnar and Zuidema (2020): prod over blocks of (0.5 mean_h A + 0.5 I), CLS row over the patches",
}


def person_masks(paths):
    """The person mask of each image from a generated SyntheticMarket (``PersonMasks``); None for
    other images and for those without a person."""
    renderers, masks = {}, []
    for path in paths:
        dataset_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if dataset_dir not in renderers:
            try:
                renderers[dataset_dir] = (PersonMasks(dataset_dir)
                                          if os.path.isfile(os.path.join(dataset_dir, MANIFEST_NAME)) else None)
            except ValueError:
                renderers[dataset_dir] = None          # another generator's manifest
        renderer = renderers[dataset_dir]
        mask = renderer(path) if renderer is not None and path in renderer else None
        masks.append(mask if mask is not None and mask.any() else None)   # a background crop: no person
    return masks


def shares(results):
    """Per image: each map's share inside the person (``name``; per head ``name/heads``, (N, H)),
    its effective number of patches (``name/patches``) and per model the chance level (the mean
    coverage of its patches); shares are NaN for images without a person."""
    out = {}
    for kind, res in results.items():
        out[f"chance_{kind}"] = np.array([c.mean().item() if c is not None else np.nan for c in res.coverages])
        for name, value in res.maps.items():
            out[name] = np.array([mask_share(head_mean(value[i]), c).item() if c is not None else np.nan
                                  for i, c in enumerate(res.coverages)])
            if value.dim() == 4:
                out[f"{name}/heads"] = np.stack([mask_share(value[i], c).numpy() if c is not None
                                                 else np.full(value.shape[1], np.nan)
                                                 for i, c in enumerate(res.coverages)])
            out[f"{name}/patches"] = effective_patches(value.mean(dim=1) if value.dim() == 4 else value).numpy()
    return out


def effective_patches(maps):
    """exp(entropy) of maps (N, gh, gw) summing to one: how many patches a map spreads over (the
    number of patches for a uniform map, one for a single patch)."""
    flat = maps.flatten(1).double()
    return torch.exp(-(flat * flat.clamp_min(1e-30).log()).sum(dim=1))


def paired_difference(values, reference, seed=0, draws=2000):
    """Mean of ``values - reference`` over images and its 95% bootstrap interval (fixed seed)."""
    diff = values - reference
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    return float(diff.mean()), [float(v) for v in np.percentile(means, [2.5, 97.5])]


def summarise(per_image):
    """Mean share of each map over the images with a person, its ratio to chance, and how often
    each of PromptSG's maps puts more of its mass inside the person than each baseline map."""
    keep = ~np.isnan(per_image["chance_promptsg"])
    summary = {"images": int(len(keep)), "images_with_person": int(keep.sum()),
               "definitions": DEFINITIONS, "maps": {}}
    for name in LABELS:
        if name not in per_image:
            continue
        chance = per_image["chance_baseline" if name.startswith("baseline") else "chance_promptsg"][keep]
        values = per_image[name][keep]
        row = {"label": LABELS[name], "mean_share": float(values.mean()), "std_share": float(values.std()),
               "median_share": float(np.median(values)), "chance": float(chance.mean()),
               "ratio_to_chance": float(values.mean() / chance.mean()),
               "median_effective_patches": float(np.median(per_image[f"{name}/patches"]))}
        if f"{name}/heads" in per_image:
            row["mean_share_per_head"] = [float(v) for v in per_image[f"{name}/heads"][keep].mean(axis=0)]
        if not name.startswith("baseline"):       # paired: the same image's baseline maps
            row["against"] = {}
            for b in ("baseline", "baseline_last_block"):
                if b in per_image:
                    difference, interval = paired_difference(values, per_image[b][keep])
                    row["against"][b] = {"images_above": float((values > per_image[b][keep]).mean()),
                                         "mean_difference": difference, "mean_difference_ci95": interval}
        summary["maps"][name] = row
    return summary


def share_table(summary):
    """The summary's shares as a table (tabulate's github format) under a paragraph saying what
    each column is."""
    def against(r, b):
        if b not in r.get("against", {}):
            return "-"
        a = r["against"][b]
        lo, hi = a["mean_difference_ci95"]
        return f"{a['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], {a['images_above']:.0%}"

    rows = [[r["label"], f"{r['mean_share']:.3f} ± {r['std_share']:.3f}", f"{r['chance']:.3f}",
             f"{r['ratio_to_chance']:.2f}", f"{r['median_effective_patches']:.0f}", against(r, "baseline"),
             against(r, "baseline_last_block")]
            for r in summary["maps"].values()]
    table = tabulate(rows, headers=["Map", "Share inside", "Chance", "x chance", "Spread (patches)",
                                    "vs baseline rollout", "vs baseline last block"], tablefmt="github")
    return (f"Attention mass inside the person, {summary['images_with_person']} of {summary['images']} images "
            f"(those with a person; mean ± std over them). Chance: a uniform map's share, the mean patch "
            f"coverage. Spread: the effective number of patches, exp(entropy), median. Against a baseline map: "
            f"the mean paired difference of the share [95% bootstrap interval], and the images where it is "
            f"larger.\n" + table)
