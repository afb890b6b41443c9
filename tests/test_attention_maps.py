"""Attention maps (promptsg/analysis/attention_maps.py, attention_shares.py, tools/attention_maps.py)
and the synthetic person masks they are measured against (promptsg.data.PersonMasks).

The maps are checked against computations written here: softmax(Q K^T / sqrt(d)) from the
in-projection weights and PyTorch's own MultiheadAttention weights for the MIM cross-attention,
the rollout product written out for a two-block ViT, patch coverage by explicit loops. The masks
are checked against the generator's images: the dataset files are those of the generator before
masks existed (a digest), every file is re-rendered byte for byte, and the mask is where drawing
the person changes the image.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG and the datasets)
import promptsg.modeling.interaction
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer
from fastreid.utils.checkpoint import Checkpointer
from open_clip.transformer import VisionTransformer
from promptsg.analysis.attention_maps import (PatchGrid, attention_rollout, cls_attention_maps, mask_share,
                                     patch_coverage, pixel_density, promptsg_cross_attention)
from promptsg.modeling.clip_backbone import CLIPVisualBackbone
from promptsg.data import PersonMasks, synthetic
from promptsg.modeling.interaction import MultimodalInteraction

from test_promptsg_model import batch, tiny_cfg
from tiny_runs import BASELINE_CFG, PROMPTSG_CFG, ROOT, TINY, load_tool

TOOL = os.path.join(ROOT, "tools", "attention_maps.py")
TINY_DIR = "SyntheticMarketTiny"
# sha256 over the tiny split's .jpg files (relative path, then bytes, in sorted order) as the
# generator wrote them before it could draw masks (commit 0ec7db1), with the pinned Pillow 13.0.0.
TINY_SPLIT_DIGEST = "854bcc851b8aef632119332baeb56912aa594f8de595ce4c3c9bb346b2e4ebd9"


def hand_attention(q_x, k_x, attn):
    """softmax(Q K^T / sqrt(d)) per head, Q = q_x W_q^T + b_q, K = k_x W_k^T + b_k: (B, H, N, S)."""
    w_q, w_k, _ = attn.in_proj_weight.detach().double().chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.detach().double().chunk(3)
    heads = attn.num_heads
    d = q_x.shape[-1] // heads
    q = (q_x.double() @ w_q.T + b_q).reshape(*q_x.shape[:2], heads, d).transpose(1, 2)
    k = (k_x.double() @ w_k.T + b_k).reshape(*k_x.shape[:2], heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)


def randomise_norms_and_biases(blocks):
    """PyTorch starts LayerNorms at the identity and attention biases at zero: random values make
    a swapped norm or a dropped bias show (the key bias must cancel in the softmax)."""
    with torch.no_grad():
        for blk in blocks:
            torch.nn.init.normal_(blk.q_proj.bias if hasattr(blk, "q_proj") else blk.attn.in_proj_bias)
            for norm in (m for m in blk.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight.normal_(1.0, 0.5)
                norm.bias.normal_(0.0, 0.5)


# ---- the MIM's cross-attention ----

def test_cross_attention_weights_are_the_softmax_of_projected_queries_and_keys():
    torch.manual_seed(0)
    mim = MultimodalInteraction(16, heads=4, cross_layers=2, self_layers=1, fusion="attention").eval()
    randomise_norms_and_biases(mim.cross)
    query, patches = torch.randn(2, 3, 16), torch.randn(2, 12, 16)
    with torch.no_grad():
        weights = mim.cross_attention_weights(query, patches)
        assert len(weights) == 2
        q = query
        for blk, w in zip(mim.cross, weights):
            assert w.shape == (2, 3, 4, 12)                                       # (B, Q, H, M)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4))
            expected = hand_attention(blk.ln_1(q), blk.ln_1_kv(patches), blk.attn).transpose(1, 2)
            torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-6)
            _, torch_weights = blk.attn(blk.ln_1(q), blk.ln_1_kv(patches), blk.ln_1_kv(patches),
                                        need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(w, torch_weights.transpose(1, 2), rtol=1e-5, atol=1e-6)
            kv = blk.ln_1_kv(patches)
            x = blk.attn(blk.ln_1(q), kv, kv, need_weights=False)[0]           # Eq. 7: no residual from q
            q = x + blk.mlp(blk.ln_2(x))


@pytest.mark.parametrize("fusion, prior, keys", [("learned_map", "", ""), ("learned_map", "cls_attention", ""),
                                                 ("learned_map", "", "penultimate"), ("attention", "", "")])
@pytest.mark.parametrize("prompt, query", [("simplified", "pooled"), ("composed", "tokens")])
def test_promptsg_maps_are_the_weights_the_forward_used(monkeypatch, prompt, query, fusion, prior, keys):
    model = DefaultTrainer.build_model(tiny_cfg(**{"MODEL.PROMPTSG.INFERENCE_PROMPT": prompt,
                                                   "MODEL.PROMPTSG.MIM.QUERY": query,
                                                   "MODEL.PROMPTSG.MIM.FUSION": fusion,
                                                   "MODEL.PROMPTSG.MIM.MAP_PRIOR": prior,
                                                   "MODEL.PROMPTSG.MIM.MAP_KEYS": keys,
                                                   "MODEL.CLIP.STRIDE": 8})).eval()
    randomise_norms_and_biases(model.heads.mim.cross)
    used = []
    if fusion != "attention":                           # the map whose log biases v's logits
        original = promptsg.modeling.interaction.MultimodalInteraction.log_prompt_map

        def recording(self, q, patches, log_prior=None):
            assert (log_prior is not None) == bool(prior)
            used.append(original(self, q, patches, log_prior))
            return used[-1]

        target = (promptsg.modeling.interaction.MultimodalInteraction, "log_prompt_map")
    else:                                               # first call: the cross block; then the last block's row
        original = promptsg.modeling.interaction.few_query_attention_weights

        def recording(attn, q, kv, key_bias=None):
            used.append(original(attn, q, kv, key_bias))
            return used[-1]

        target = (promptsg.modeling.interaction, "few_query_attention_weights")

    inputs = batch()
    with torch.no_grad():
        monkeypatch.setattr(*target, recording)
        model(inputs)
        monkeypatch.undo()
        maps = promptsg_cross_attention(model, inputs["images"])
    grid = ((64 - 16) // 8 + 1, (32 - 16) // 8 + 1)     # tiny-ViT: patch 16, stride 8 at 64x32
    shown = getattr(maps, prompt)
    heads = 1 if fusion != "attention" else 2
    assert shown.shape == (8, heads, *grid)             # (B, H, gh, gw); one map for the map fusions
    torch.testing.assert_close(shown.sum((-2, -1)), torch.ones(8, heads))
    if fusion != "attention":                           # the map of the query row the feature is read from
        assert len(used) == 1
        torch.testing.assert_close(shown[:, 0], used[0].exp().unflatten(-1, grid), rtol=1e-5, atol=1e-7)
        return
    # The query whose output the MIM returns: the pooled prompt, or the prompt's EOT token (its last).
    row = 0 if query == "pooled" else used[0].shape[1] - 1
    assert query == "pooled" or row == 8                # [SOS, a, photo, of, a, s*, person, ., EOT]
    torch.testing.assert_close(shown, used[0][:, row].unflatten(-1, grid), rtol=1e-6, atol=1e-7)


# ---- the visual transformer: CLS rollout ----

def test_rollout_of_one_block_is_its_cls_attention_over_the_patches():
    torch.manual_seed(0)
    a = torch.rand(3, 2, 5, 5).softmax(-1)            # (B, H, N, N), rows sum to one
    mean = a.mean(1)
    expected = mean[:, 0, 1:] / mean[:, 0, 1:].sum(-1, keepdim=True)   # (0.5 A + 0.5 I)[0, 1:] = 0.5 A[0, 1:]
    torch.testing.assert_close(attention_rollout([a]), expected)


def test_cls_maps_of_a_two_block_vit_by_hand():
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=(32, 16), patch_size=8, width=16, layers=2, heads=2, mlp_ratio=2.0,
                               output_dim=8)
    randomise_norms_and_biases(visual.transformer.resblocks)
    backbone = CLIPVisualBackbone(visual, image_size=(32, 16)).eval()
    model = types.SimpleNamespace(backbone=backbone, preprocess_image=lambda images: images)
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        maps = cls_attention_maps(model, images)
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x)
        per_block = []
        for blk in visual.transformer.resblocks:
            h = blk.ln_1(x)
            per_block.append(blk.attn(h, h, h, need_weights=True)[1].double().numpy())   # head mean (B, N, N)
            x = blk(x)
    eye = np.eye(9)
    for b in range(2):
        a1, a2 = per_block[0][b], per_block[1][b]
        rollout = (0.5 * a2 + 0.5 * eye) @ (0.5 * a1 + 0.5 * eye)
        expected = rollout[0, 1:] / rollout[0, 1:].sum()
        np.testing.assert_allclose(maps.rollout[b].flatten().numpy(), expected, rtol=1e-5, atol=1e-6)
        last = a2[0, 1:] / a2[0, 1:].sum()
        np.testing.assert_allclose(maps.last_block[b].flatten().numpy(), last, rtol=1e-5, atol=1e-6)
    assert maps.rollout.shape == maps.last_block.shape == (2, 4, 2)


# ---- masks on the patch grid ----

def test_patch_coverage_share_and_density_of_overlapping_patches():
    grid = PatchGrid(grid=(3, 2), size=(4, 4), stride=(2, 2), image_size=(8, 6))
    rng = np.random.default_rng(0)
    mask = rng.random((8, 6)) < 0.4
    coverage = patch_coverage(mask, grid)
    for i in range(3):
        for j in range(2):
            assert coverage[i, j].item() == pytest.approx(mask[2 * i:2 * i + 4, 2 * j:2 * j + 4].mean())
    maps = torch.tensor(rng.random((2, 3, 2)), dtype=torch.float32)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    share = mask_share(maps, coverage)
    expected = [sum(maps[b, i, j].item() * coverage[i, j].item() for i in range(3) for j in range(2)) for b in range(2)]
    np.testing.assert_allclose(share.numpy(), expected, rtol=1e-6)
    density = pixel_density(maps, grid)
    assert density.shape == (2, 8, 6)
    np.testing.assert_allclose(density.sum((-2, -1)).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose((density * torch.as_tensor(mask)).sum((-2, -1)).numpy(), expected, rtol=1e-5)
    uniform = torch.full((3, 2), 1 / 6)
    assert mask_share(uniform, coverage).item() == pytest.approx(coverage.mean().item())


# ---- the synthetic person masks ----

def split_files(datasets_root):
    root = Path(datasets_root) / TINY_DIR
    return root, sorted(p for p in root.rglob("*.jpg"))


def test_tiny_split_images_are_those_of_the_generator_before_masks(datasets_root):
    root, files = split_files(datasets_root)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    assert len(files) == 172
    assert digest.hexdigest() == TINY_SPLIT_DIGEST


def test_person_masks_rerender_every_image_of_the_dataset(datasets_root):
    root, files = split_files(datasets_root)
    masks = PersonMasks(root)
    for path in files:
        image, mask = masks.render(path)
        encoded = io.BytesIO()
        synthetic._save_jpeg(image, encoded)
        assert encoded.getvalue() == path.read_bytes(), path.name
        assert mask.shape == (masks.params["height"], masks.params["width"]) and mask.dtype == bool
    with pytest.raises(KeyError, match="0999_c1s1_000000_01.jpg"):
        masks("0999_c1s1_000000_01.jpg")


def test_mask_is_where_drawing_the_person_changes_the_image(datasets_root, monkeypatch):
    """Each image rendered again without its person (same random stream, so the same noise):
    the pixels that change by more than 32 levels lie on the mask or next to it (the blur and the
    downsampling spread an edge by a pixel), and almost every mask pixel changes. Thin strokes
    (a handbag's strap) cover less than half of their pixels and stay outside the mask; they
    change the image by less."""
    root, files = split_files(datasets_root)
    masks = PersonMasks(root)
    draw_person = synthetic._draw_person

    def without_target(image, person, view, mirror, pose, cx, top, size, mask=None, mask_value=255):
        if mask is not None and mask_value == 255:   # the target's call: skip it
            return
        draw_person(image, person, view, mirror, pose, cx, top, size, mask, mask_value)

    changed_inside, people, empty = [], 0, 0
    for path in files:
        image, mask = masks.render(path)
        monkeypatch.setattr(synthetic.cameras, "_draw_person", without_target)
        background, _ = masks.render(path)
        monkeypatch.undo()
        change = np.abs(np.asarray(image, int) - np.asarray(background, int)).max(axis=2)
        if not mask.any():
            assert change.max() == 0, path.name     # a background crop: no person drawn
            empty += 1
            continue
        people += 1
        distance = ndimage.distance_transform_edt(~mask)
        assert distance[change > 32].max(initial=0) <= 1.5, path.name
        changed_inside.append((change[mask] > 8).mean())
        assert changed_inside[-1] > 0.85, path.name
    assert people > 150 and empty >= 1
    assert np.mean(changed_inside) > 0.99


# ---- tools/attention_maps.py ----

def write_checkpoint(config, out_dir, name, opts):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    model = DefaultTrainer.build_model(cfg)
    Checkpointer(model, str(out_dir)).save(name)
    return str(out_dir / f"{name}.pth")


def load_attention_tool():
    return load_tool("tools/attention_maps.py")


OPTS = [*TINY, "MODEL.CLIP.STRIDE", "8", "MODEL.DEVICE", "cpu"]
GRID = (7, 3)    # tiny-ViT, patch 16 every 8 pixels at 64x32


def test_tool_draws_and_measures_the_tiny_split(datasets_root, tmp_path):
    weights = write_checkpoint(PROMPTSG_CFG, tmp_path, "promptsg", OPTS)
    baseline = write_checkpoint(BASELINE_CFG, tmp_path, "baseline", OPTS)
    out = tmp_path / "maps"
    env = dict(os.environ, FASTREID_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, TOOL, "--config-file", PROMPTSG_CFG, "--baseline-config", BASELINE_CFG,
                             "--baseline-weights", baseline, "--dataset", "SyntheticMarketTiny", "--output", str(out),
                             "--num-vis", "2", "--per-head", *OPTS, "MODEL.WEIGHTS", weights],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("attention_maps.png", "attention_heads.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 300

    maps = np.load(out / "attention_maps.npz")
    paths = list(maps["paths"])
    dataset = promptsg.data.SyntheticMarketTiny(root=str(datasets_root))
    assert paths == [p for p, _, _ in dataset.query + dataset.gallery]
    n = len(paths)
    for name in ("simplified", "composed"):
        assert maps[name].shape == (n, 1, *GRID)      # the default learned_map: one map, not one per head
        np.testing.assert_allclose(maps[name].sum((-2, -1)), 1.0, rtol=1e-5)
    for name in ("baseline", "baseline_last_block", "promptsg_rollout", "promptsg_last_block"):
        assert maps[name].shape == (n, *GRID)
        np.testing.assert_allclose(maps[name].sum((-2, -1)), 1.0, rtol=1e-5)

    # The JSON's shares, recomputed: each patch's covered fraction by hand (the 128x64 images are
    # resized to 64x32: a patch is a 32x32 window every 16 pixels of the image), without the
    # images without a person.
    person = PersonMasks(Path(datasets_root) / TINY_DIR)
    assert tuple(person.size) == (128, 64)
    coverages = []
    for path in paths:
        mask = person(path)
        if mask.any():
            coverages.append(np.array([[mask[16 * i:16 * i + 32, 16 * j:16 * j + 32].mean() for j in range(GRID[1])]
                                       for i in range(GRID[0])]))
        else:
            coverages.append(None)
    keep = [i for i, c in enumerate(coverages) if c is not None]
    summary = json.loads((out / "attention_in_person.json").read_text())
    assert summary["images"] == n and summary["images_with_person"] == len(keep) < n
    rows = summary["maps"]
    chance = np.mean([coverages[i].mean() for i in keep])
    for name, value in (("simplified", maps["simplified"].mean(1)), ("baseline", maps["baseline"])):
        expected = np.mean([(value[i] * coverages[i]).sum() for i in keep])
        assert rows[name]["mean_share"] == pytest.approx(expected, rel=1e-5)
        assert rows[name]["chance"] == pytest.approx(chance, rel=1e-5)
    assert "SyntheticMarketTiny" in summary["command"] and summary["commit"]
    assert len(rows["simplified"]["mean_share_per_head"]) == 1
    for name, value in (("simplified", maps["simplified"].mean(1)), ("baseline", maps["baseline"])):
        flat = value.reshape(n, -1).astype(np.float64)
        spread = np.median(np.exp(-(flat * np.log(flat)).sum(1)))
        assert rows[name]["median_effective_patches"] == pytest.approx(spread, rel=1e-6)
    assert rows["simplified"]["against"]["baseline"]["mean_difference"] == pytest.approx(
        rows["simplified"]["mean_share"] - rows["baseline"]["mean_share"], abs=1e-9)


BAD_INPUT = {
    "missing image": (PROMPTSG_CFG, ["--images", "nothing.jpg"], [], "no such file or folder: .*nothing.jpg"),
    "no MIM": (BASELINE_CFG, ["--images", "."], [], "clip_baseline_small_vit.yml: not a PromptSG model with a MIM"),
    # The ResNet's map without the default's keys and prior (which need a ViT; test_run_guards).
    "not a ViT": (PROMPTSG_CFG, ["--images", "."], ["MODEL.CLIP.NAME", "tiny-RN", "MODEL.PROMPTSG.MIM.MAP_KEYS", "",
                                                    "MODEL.PROMPTSG.MIM.MAP_PRIOR", ""],
                  "MODEL.CLIP.NAME tiny-RN is not a ViT"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_tool_bad_input_is_one_line_naming_it(tmp_path, monkeypatch, case):
    config, source, opts, message = BAD_INPUT[case]
    tool = load_attention_tool()
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"never read: the bad input is found first")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(promptsg.engine.preflight.InputError, match=message):
        tool.main(["--config-file", config, *source, "--output", "out", *OPTS, *opts, "MODEL.WEIGHTS", str(weights)])
    assert not (tmp_path / "out").exists()


def test_effective_patches_of_a_uniform_map_is_the_grid_size_and_of_one_patch_is_one():
    from promptsg.analysis.attention_shares import effective_patches

    uniform, single = torch.full((1, 7, 3), 1 / 21), torch.zeros(1, 7, 3)
    single[0, 2, 1] = 1.0
    halves = torch.zeros(1, 7, 3)
    halves[0, 0, 0] = halves[0, 6, 2] = 0.5
    assert effective_patches(torch.cat([uniform, single, halves])).tolist() == pytest.approx([21, 1, 2])
