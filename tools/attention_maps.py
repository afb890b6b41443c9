#!/usr/bin/env python
"""Where PromptSG's text query looks, beside the CLIP baseline: attention maps drawn as PNG grids.

    # the test split of a dataset (query + gallery), against the CLIP baseline
    python tools/attention_maps.py --config-file logs/synthetic/promptsg_small_vit/config.yaml \\
        --baseline-config logs/synthetic/clip_baseline_small_vit/config.yaml \\
        --baseline-weights logs/synthetic/clip_baseline_small_vit/model_final.pth \\
        --dataset SyntheticMarket --output attention/ --num-vis 8 --per-head \\
        MODEL.WEIGHTS logs/synthetic/promptsg_small_vit/model_final.pth
    # chosen images (files or folders), PromptSG alone
    python tools/attention_maps.py --config-file CFG --images a.jpg b.jpg /data/cam1 --output DIR \\
        MODEL.WEIGHTS model.pth

Maps (promptsg/analysis/attention_maps.py): PromptSG's MIM cross-attention of the prompt embedding over the
patch tokens (the paper's Fig. 1 and 5), for the simplified prompt "A photo of a person." and the
composed prompt "A photo of a s* person.", averaged over heads and per head; the baseline's map is
the CLS attention rollout through its visual transformer. The images go through FastReID's test
transforms, as in evaluation (no flip). ``KEY VALUE`` overrides apply to both configs;
MODEL.WEIGHTS is PromptSG's checkpoint, ``--baseline-weights`` the baseline's. Models with SIE
take the dataset's camera ids, or ``--camera`` for --images.

Images of a generated SyntheticMarket dataset come with their person's silhouette
(``promptsg.data.PersonMasks``): then the tool also measures the share of each map's mass
inside the person (the mask's coverage of each patch, weighted by the map), prints a table of the
means against the chance level (the mass a uniform map puts there, the mean coverage) and writes
``attention_in_person.json`` (or ``--shares-json``). Images without a person (background crops)
are left out of the means.

Writes to --output: ``attention_maps.png`` (one column per drawn image, ``--num-vis`` of them spread
evenly over the list: the image with its person outlined when known, then the baseline's map and
the two PromptSG maps as heatmaps over it, each with its share inside the person),
``attention_heads.png`` with ``--per-head`` (each head of both prompts), ``attention_maps.npz``
(every map of every image, on the patch grid) and the JSON above.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

import promptsg  # noqa: E402,F401  (patches FastReID, registers PromptSG)
from fastreid.data.build import build_reid_test_loader  # noqa: E402
from fastreid.data.common import CommDataset  # noqa: E402
from fastreid.data.datasets import DATASET_REGISTRY  # noqa: E402
from fastreid.data.transforms import build_transforms  # noqa: E402
from fastreid.engine import DefaultTrainer  # noqa: E402
from promptsg.analysis.attention_maps import (PatchGrid, cls_attention_maps, mask_share, patch_coverage,  # noqa: E402
                                     patch_grid, pixel_density, promptsg_cross_attention)
from promptsg.engine.checkpoint import NonFiniteError, load_for_inference  # noqa: E402
from promptsg.data.synthetic import MANIFEST_NAME, PersonMasks  # noqa: E402
from promptsg.engine.preflight import InputError, check_config, load_checkpoint_config, verify_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Map name -> row label in the figure and the table.
LABELS = {"baseline": "CLIP baseline (CLS rollout)",
          "simplified": 'PromptSG MIM, "A photo of a person"',
          "composed": 'PromptSG MIM, "A photo of a s* person"',
          "baseline_last_block": "CLIP baseline (last block's CLS attention)",
          "promptsg_rollout": "PromptSG's visual encoder (CLS rollout)",
          "promptsg_last_block": "PromptSG's visual encoder (last block's CLS attention)"}


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the PromptSG model's config")
    parser.add_argument("--baseline-config", metavar="FILE", help="the CLIP baseline's config")
    parser.add_argument("--baseline-weights", metavar="FILE", help="the CLIP baseline's checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders of images")
    source.add_argument("--dataset", metavar="NAME", help="a dataset's test split (query + gallery), "
                                                           "found under $FASTREID_DATASETS")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--num-vis", type=int, default=8, help="images drawn (spread evenly over the list)")
    parser.add_argument("--per-head", action="store_true", help="also draw every head's map")
    parser.add_argument("--camera", type=int, default=None,
                        help="camera index of --images for models with SIE (MODEL.CLIP.SIE_CAMERA)")
    parser.add_argument("--shares-json", metavar="FILE",
                        help="where the shares inside the person go (default OUTPUT/attention_in_person.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num_vis < 1:
        parser.error("--num-vis must be >= 1")
    if bool(args.baseline_config) != bool(args.baseline_weights):
        parser.error("--baseline-config and --baseline-weights go together")
    return args


# ---- set-up: configs, images, masks (one-line errors before any model is built) ----

def setup_configs(args):
    """PromptSG's config (and the baseline's), checked as ``train_net.py --eval-only`` checks them."""
    cfg = load_checkpoint_config(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "PromptSG" or cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS < 1:
        raise InputError(f"{args.config_file}: not a PromptSG model with a MIM (MODEL.META_ARCHITECTURE "
                         f"{cfg.MODEL.META_ARCHITECTURE}, MODEL.PROMPTSG.MIM.CROSS_LAYERS "
                         f"{cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS}); give the baseline as --baseline-config")
    cfgs = {"promptsg": cfg}
    if args.baseline_config:
        opts = without_key(args.opts, "MODEL.WEIGHTS") + ["MODEL.WEIGHTS", args.baseline_weights]
        base = load_checkpoint_config(args.baseline_config, opts)
        if base.MODEL.META_ARCHITECTURE != "PromptSG" or base.MODEL.BACKBONE.NAME != "build_clip_backbone":
            raise InputError(f"{args.baseline_config}: not a CLIP model of this project "
                             f"(MODEL.META_ARCHITECTURE {base.MODEL.META_ARCHITECTURE})")
        cfgs["baseline"] = base
    for path, c in zip((args.config_file, args.baseline_config), cfgs.values()):
        check_model(c, path, args)
        c.freeze()
    return cfgs


def check_model(cfg, path, args):
    """The config's values as train_net.py checks them; maps need a CLIP ViT (the rollout walks its
    blocks); an SIE model needs the images' camera."""
    from promptsg.modeling.clip_weights import _model_config

    check_config(cfg)
    layers = _model_config(cfg.MODEL.CLIP.NAME).get("vision_cfg", {}).get("layers")
    if not isinstance(layers, int):
        raise InputError(f"{path}: MODEL.CLIP.NAME {cfg.MODEL.CLIP.NAME} is not a ViT; the attention maps "
                         f"need a CLIP ViT visual encoder")
    if cfg.MODEL.CLIP.SIE_CAMERA and args.images and args.camera is None:
        raise InputError(f"{path}: MODEL.CLIP.SIE_CAMERA is on: give --camera, the training camera index "
                         f"the --images get (0..{cfg.MODEL.CLIP.NUM_CAMERAS - 1})")


def without_key(opts, key):
    """``KEY VALUE`` overrides less those of ``key``."""
    pairs = list(zip(opts[::2], opts[1::2]))
    return [item for k, v in pairs if k != key for item in (k, v)]


def list_items(args):
    """[(image path, camera id)] to map, checked (missing paths, unreadable images) in one line."""
    if args.dataset:
        if args.dataset not in DATASET_REGISTRY._obj_map:
            raise InputError(f"--dataset: unknown dataset {args.dataset!r} (known: "
                             f"{', '.join(sorted(DATASET_REGISTRY._obj_map))})")
        root = os.getenv("FASTREID_DATASETS", "datasets")
        try:
            dataset = DATASET_REGISTRY.get(args.dataset)(root=root)
        except (RuntimeError, AssertionError) as exc:
            raise InputError(f"--dataset {args.dataset}: {' '.join(str(exc).split())} "
                             f"(datasets root: {os.path.abspath(root)}, set FASTREID_DATASETS)") from None
        return [(path, camid) for path, _, camid in dataset.query + dataset.gallery]
    paths = []
    for path in args.images:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                           if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InputError(f"--images: no {'/'.join(IMAGE_EXTENSIONS)} image under {path}")
            paths += found
        elif os.path.isfile(path):
            paths.append(path)
        else:
            raise InputError(f"--images: no such file or folder: {path}")
    for path in paths:
        verify_image(path)
    return [(path, args.camera or 0) for path in paths]


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


# ---- the maps ----

class ModelMaps(NamedTuple):
    """One model's maps of every image: ``maps`` name -> (N, H, gh, gw) per head (cross-attention)
    or (N, gh, gw) (rollout); ``images`` (N, 3, H, W) its inputs (uint8); ``coverages`` each
    image's person-mask coverage of the patches (gh, gw), None without a person."""
    cfg: object
    grid: PatchGrid
    maps: dict
    images: torch.Tensor
    coverages: list


def build_model(cfg):
    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    return model.eval()


def compute_maps(cfg, model, items, kind):
    """Every image's maps by one model, on its patch grid: the CLS rollout and last-block CLS
    attention of its encoder and, for ``kind`` "promptsg", the MIM's cross-attention per head with
    each prompt; and the model's input images."""
    test_set = CommDataset([(path, 0, camid) for path, camid in items], build_transforms(cfg, is_train=False),
                           relabel=False)
    loader = build_reid_test_loader(cfg, test_set=test_set, num_query=0,
                                    num_workers=cfg.DATALOADER.NUM_WORKERS)[0]
    sie = model.backbone.sie_embed is not None
    maps, images = {}, []
    for batch in tqdm(loader, desc=f"{kind} maps", unit="batch", disable=len(loader) < 3):
        camids = batch["camids"].to(model.device) if sie else None
        cls = cls_attention_maps(model, batch["images"], camids)
        prefix = "baseline" if kind == "baseline" else "promptsg_rollout"
        out = {prefix: cls.rollout, f"{kind}_last_block": cls.last_block}
        if kind == "promptsg":
            out.update(promptsg_cross_attention(model, batch["images"], camids)._asdict())
        for name, value in out.items():
            if value is not None:
                maps.setdefault(name, []).append(value.float().cpu())
        images.append(batch["images"].clamp(0, 255).round().to(torch.uint8))
    return {name: torch.cat(values) for name, values in maps.items()}, torch.cat(images)


def mask_at_input(mask, cfg):
    """A person mask (h, w) bool brought to the model's input as the test transforms bring the
    image (resize to INPUT.SIZE_TEST, centre crop if INPUT.CROP.ENABLED): (H, W) float, each input
    pixel's covered fraction (area resampling: exact box averages for integer scale factors)."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    size = list(cfg.INPUT.SIZE_TEST)
    if size[0] > 0:
        if len(size) == 1:       # torchvision's rule: the shorter side to that size
            h, w = m.shape[-2:]
            size = [size[0], round(size[0] * w / h)] if h > w else [round(size[0] * h / w), size[0]]
        m = F.interpolate(m, size=size, mode="area")
    if cfg.INPUT.CROP.ENABLED:
        m = TF.center_crop(m, list(cfg.INPUT.CROP.SIZE))
    return m[0, 0]


def head_mean(value):
    """A map averaged over its heads (a rollout map has none)."""
    return value.mean(dim=-3) if value.dim() >= 3 else value


# ---- shares inside the person ----

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


def print_table(summary):
    from tabulate import tabulate

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
    print(f"Attention mass inside the person, {summary['images_with_person']} of {summary['images']} images "
          f"(those with a person; mean ± std over them). Chance: a uniform map's share, the mean patch "
          f"coverage. Spread: the effective number of patches, exp(entropy), median. Against a baseline map: "
          f"the mean paired difference of the share [95% bootstrap interval], and the images where it is larger.")
    print(tabulate(rows, headers=["Map", "Share inside", "Chance", "x chance", "Spread (patches)",
                                  "vs baseline rollout", "vs baseline last block"], tablefmt="github"))


def run_info(argv):
    """Date, commit and machine of this measurement."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": str(datetime.datetime.now(datetime.timezone.utc).date()), "commit": commit,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
            "command": " ".join(["python", "tools/attention_maps.py", *argv])}


# ---- figures ----

def figure_rows(results, per_head):
    """The rows under the image row: [(label, model kind, map name, head or None for the mean)]."""
    rows = [(LABELS[name], "baseline", name, None) for name in ("baseline", "baseline_last_block")
            if "baseline" in results]
    for name in ("simplified", "composed"):
        value = results["promptsg"].maps.get(name)
        if value is not None:
            heads = range(value.shape[1]) if per_head else [None]
            rows += [(LABELS[name] + (f", head {h}" if h is not None else ""), "promptsg", name, h) for h in heads]
    return rows


def to_image(tensor):
    """A (3, H, W) uint8 input image as an (H, W, 3) array."""
    return tensor.permute(1, 2, 0).numpy()


def draw_map(ax, res, i, value):
    """``value`` (gh, gw) as a heatmap over the image (scaled to its maximum), with its share inside
    the person when known."""
    image = to_image(res.images[i])
    density = pixel_density(value, res.grid).numpy()
    ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.imshow(density / max(float(density.max()), 1e-12), cmap="jet", alpha=0.5, vmin=0, vmax=1,
              interpolation="nearest")
    if res.coverages[i] is not None:
        share = float(mask_share(value, res.coverages[i]))
        ax.text(1, image.shape[0] - 2, f"in person {share:.0%}", color="white", fontsize=5,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})


def draw_figure(path, indices, items, results, masks, per_head, dpi):
    """One column per image: the image (its person outlined), then one heatmap per row."""
    rows = figure_rows(results, per_head)
    fig, axes = plt.subplots(1 + len(rows), len(indices), squeeze=False,
                             figsize=(0.95 * len(indices) + 0.5, 1.75 * (1 + len(rows))))
    base = results["promptsg"]
    for c, i in enumerate(indices):
        ax = axes[0, c]
        ax.imshow(to_image(base.images[i]), interpolation="nearest")
        title = os.path.basename(items[i][0])
        if base.coverages[i] is not None:
            ax.contour(mask_at_input(masks[i], base.cfg).numpy(), levels=[0.5], colors="white", linewidths=0.6)
            title += f"\nperson: {base.coverages[i].mean():.0%}"
        ax.set_title(title, fontsize=5)
        for r, (_, kind, name, head) in enumerate(rows, 1):
            value = results[kind].maps[name][i]
            draw_map(axes[r, c], results[kind], i, head_mean(value) if head is None else value[head])
    for r, label in enumerate(["image"] + [row[0] for row in rows]):
        axes[r, 0].set_ylabel(label.replace(" (", "\n(").replace(' "', '\n"'), fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout(pad=0.2, h_pad=0.3, w_pad=0.2)
    save_png(fig, path, dpi)


def save_png(fig, path, dpi):
    """The figure as a 256-colour PNG, about a third of the size of an RGB one; the heatmaps lie over
    greyscale images, so 256 colours show them without visible banding."""
    from PIL import Image

    fig.set_dpi(dpi)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, kmeans=4).save(path, optimize=True)


def save_maps(path, items, results):
    arrays = {"paths": np.array([p for p, _ in items])}
    for res in results.values():
        arrays.update({name: value.numpy() for name, value in res.maps.items()})
    np.savez_compressed(path, **arrays)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfgs = setup_configs(args)
    items = list_items(args)
    masks = person_masks([path for path, _ in items])
    os.makedirs(args.output, exist_ok=True)

    results = {}
    for kind in ("baseline", "promptsg"):      # the figures and the table put the baseline first
        if kind in cfgs:
            cfg, model = cfgs[kind], build_model(cfgs[kind])
            grid = patch_grid(model.backbone)
            maps, images = compute_maps(cfg, model, items, kind)
            coverages = [patch_coverage(mask_at_input(m, cfg), grid) if m is not None else None for m in masks]
            results[kind] = ModelMaps(cfg, grid, maps, images, coverages)

    indices = np.unique(np.linspace(0, len(items) - 1, min(args.num_vis, len(items))).round().astype(int))
    written = ["attention_maps.png", "attention_maps.npz"]
    draw_figure(os.path.join(args.output, "attention_maps.png"), indices, items, results, masks, False, dpi=200)
    if args.per_head:
        draw_figure(os.path.join(args.output, "attention_heads.png"), indices, items, results, masks, True, dpi=150)
        written.append("attention_heads.png")
    save_maps(os.path.join(args.output, "attention_maps.npz"), items, results)

    per_image = shares(results)
    if not np.isnan(per_image["chance_promptsg"]).all():
        summary = {**run_info(argv), **summarise(per_image)}
        print_table(summary)
        json_path = args.shares_json or os.path.join(args.output, "attention_in_person.json")
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        written.append(json_path)
    print(f"{len(items)} images; {', '.join(written)} in {args.output}")
    return per_image


if __name__ == "__main__":
    try:
        main()
    except (InputError, NonFiniteError) as exc:
        sys.exit(f"error: {exc}")
