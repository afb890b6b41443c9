"""Behaviour, not formulas: a short PromptSG run from a small CLIP pretrained on synthetic captions
drives L_SupCon clearly below chance, with the image-prompt alignment its diagnostics show.

The CLIP is pretrained here (tools/pretrain_synthetic_clip.py, about 65 s on two cores) at 64x32;
the PromptSG run trains tools/train_net.py with the main job's config on SyntheticMarket at 64x32 for
3 epochs (about 25 s) and is evaluated with both test prompts; the tests read its metrics.json and
results. The CLIP must tie words to images: from
one pretrained for half as long (150 steps, 33% zero-shot caption top-1 among 10 against 66%), the
same run's prompts barely differ and its image embeddings collapse (L_SupCon stays at chance).
"""
import json
import os
import subprocess
import sys

import pytest

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from promptsg.modeling.diagnostics import supcon_levels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "projects/PromptSG/configs/Synthetic/promptsg_small_vit.yml")
PRETRAIN = ["--model", "small-ViT", "--num-ids", "1000", "--images-per-id", "2", "--eval-ids", "50",
            "--steps", "300", "--batch", "32", "--warmup", "20", "--lr", "1e-3", "--size", "64", "32"]
RUN = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING.SIZE", "3",
       "SOLVER.IMS_PER_BATCH", "32", "SOLVER.MAX_EPOCH", "3", "SOLVER.STEPS", "[2]", "SOLVER.WARMUP_ITERS", "20",
       "TEST.EVAL_PERIOD", "3", "SOLVER.CHECKPOINT_PERIOD", "3", "DATALOADER.NUM_WORKERS", "0",
       "TEST.IMS_PER_BATCH", "128", "SEED", "0"]


def python(args, root):
    env = dict(os.environ, FASTREID_DATASETS=str(root), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """The datasets root and the small CLIP pretrained there at 64x32."""
    root = tmp_path_factory.mktemp("datasets")
    clip = root / "SyntheticCLIP" / "small-ViT-64x32.pt"
    python([os.path.join(ROOT, "tools", "pretrain_synthetic_clip.py"), *PRETRAIN, "--pool", str(root / "pool"),
            "--out", str(clip)], root)
    return root, clip


def short_run(small_clip, out_dir, *overrides):
    """The short run trained into ``out_dir`` (results.json: the simplified prompt), and --eval-only
    of its checkpoint with the composed prompt into ``out_dir/composed``."""
    root, clip = small_clip
    train_net = [os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG]
    opts = ["MODEL.CLIP.PRETRAINED", str(clip), *RUN, *overrides]
    python([*train_net, *opts, "OUTPUT_DIR", str(out_dir)], root)
    python([*train_net, "--eval-only", *opts, "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
            "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "OUTPUT_DIR", str(out_dir / "composed")], root)
    return out_dir


@pytest.fixture(scope="module")
def promptsg_run(small_clip, tmp_path_factory):
    return short_run(small_clip, tmp_path_factory.mktemp("promptsg"))


def test_supcon_falls_clearly_below_chance_and_images_find_their_prompts(promptsg_run):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(str(promptsg_run / "config.yaml"))
    chance, floor = supcon_levels(cfg)                   # 32 images of 8 identities: 13.86 and 5.55
    records = [json.loads(line) for line in (promptsg_run / "metrics.json").read_text().splitlines()]
    training = [r for r in records if "loss_supcon" in r]
    first, last = training[0], training[-1]              # medians of the first and last iterations
    assert last["loss_supcon"] < chance - 0.25 * (chance - floor), (first, last)
    assert last["loss_supcon"] < first["loss_supcon"] - 1.0
    top1_chance = cfg.DATALOADER.NUM_INSTANCE / cfg.SOLVER.IMS_PER_BATCH
    assert last["align_i2t_top1"] >= 4 * top1_chance and last["align_t2i_top1"] >= 4 * top1_chance
    assert last["collapse_v_cos"] < 0.95 and last["collapse_text_cos"] < 0.95   # neither side collapsed


# The simplified test prompt against the composed one on this short run: a MIM that reads the feature
# at v (the default learned_map, as reweight before it) takes the identity from v and the patches,
# not from its query. Measured with reweight, seeds 0, 1, 2 (2026-12-04, 2-core CPU machine, one
# thread): composed - simplified 0.11, -0.04, 0.08 mAP (of 17-20); with the query added back (the
# removed query_residual) 7.8, 5.9, 6.4. The bound leaves room for other machines and thread
# counts and still fails a wiring that lets the query's content reach the feature.
SIMPLIFIED_GAP_BOUND = 2.0


def test_simplified_prompt_scores_close_to_the_composed_prompt(promptsg_run):
    simplified = json.loads((promptsg_run / "results.json").read_text())["mAP"]
    composed = json.loads((promptsg_run / "composed" / "eval_results.json").read_text())["mAP"]
    assert abs(composed - simplified) <= SIMPLIFIED_GAP_BOUND, (simplified, composed)
