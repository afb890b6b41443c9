"""promptsg.analysis.guidance (tools/run_ablations.py --guidance): its rankings are FastReID's
evaluation of the same checkpoint, its controls swap in the queries they name, its attention share
is the map the forward uses weighted by the person's coverage, and its figures are the
differences the targets read."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from promptsg.analysis import guidance
from promptsg.analysis.attention_maps import mask_at_input, patch_coverage, patch_grid
from promptsg.analysis.attention_inputs import build_model
from promptsg.analysis.simplified_gap import run_config

from tiny_runs import PROMPTSG_CFG, ROOT, TINY, TRAIN_NET


@pytest.fixture(scope="module")
def tiny_run(datasets_root, tmp_path_factory):
    """A one-epoch tiny PromptSG run (results.json: the simplified prompt), and --eval-only of its
    checkpoint with the composed prompt."""
    out = tmp_path_factory.mktemp("logs")
    one_epoch = [*TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]
    env = dict(os.environ, FASTREID_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    for args in (["--config-file", PROMPTSG_CFG, *one_epoch, "OUTPUT_DIR", str(out / "run")],
                 ["--config-file", PROMPTSG_CFG, "--eval-only", *one_epoch, "MODEL.PROMPTSG.INFERENCE_PROMPT",
                  "composed", "MODEL.WEIGHTS", str(out / "run" / "model_final.pth"), "OUTPUT_DIR",
                  str(out / "composed")]):
        result = subprocess.run([sys.executable, TRAIN_NET, *args], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_rankings_with_the_test_prompts_are_fastreids_evaluation_of_the_checkpoint(tiny_run, datasets_root):
    measured = guidance.PromptGuidance(str(datasets_root)).measure(str(tiny_run / "run"))
    simplified = json.loads((tiny_run / "run" / "results.json").read_text())
    composed = json.loads((tiny_run / "composed" / "eval_results.json").read_text())
    for row, expected in (("simplified", simplified), ("composed", composed)):
        assert measured[row]["mAP"] == pytest.approx(expected["mAP"], abs=1e-4)
        assert measured[row]["Rank-1"] == pytest.approx(expected["Rank-1"], abs=1e-4)
    assert measured["no_person_prompt"] == "A photo of a car."
    assert "baseline_last_block_share" not in measured                  # no baseline run given
    # Kept in the run and read back from there.
    assert json.loads((tiny_run / "run" / guidance.FILE_NAME).read_text()) == measured
    assert guidance.PromptGuidance(str(datasets_root)).measure(str(tiny_run / "run")) == measured


def test_controls_are_the_queries_they_name(tiny_run, datasets_root, monkeypatch):
    """With the simplified prompt as the "no person" prompt that row is the simplified one, and with
    no words added the image + words rows are the composed prompt's."""
    cfg = run_config(str(tiny_run / "run"))
    model = build_model(cfg)
    split = guidance.EvaluationSplit(cfg.DATASETS.TESTS[0], str(datasets_root))
    monkeypatch.setattr(guidance, "NO_PERSON_PROMPT", cfg.MODEL.PROMPTSG.SIMPLE_PROMPT)
    split.words = split.other_words = {pid: "" for pid in split.pids}
    rows = guidance.test_prompt_rankings(cfg, model, split)
    assert rows["no_person"] == pytest.approx(rows["simplified"], abs=1e-6)
    assert rows["own_words"] == pytest.approx(rows["composed"], abs=1e-6)
    assert rows["other_words"] == pytest.approx(rows["composed"], abs=1e-6)
    assert model.inference_prompt == cfg.MODEL.PROMPTSG.INFERENCE_PROMPT      # left as it was


@torch.no_grad()
def test_attention_share_is_the_forwards_map_weighted_by_the_persons_coverage(tiny_run, datasets_root):
    cfg = run_config(str(tiny_run / "run"))
    model = build_model(cfg)
    measurer = guidance.PromptGuidance(str(datasets_root))
    split = measurer.split(cfg.DATASETS.TESTS[0])
    paths = split.query_paths[:6]
    shares = measurer.attention_shares(cfg, model, None, paths, split)
    # By hand: the map the MIM's forward uses for the simplified prompt, image by image, without
    # FastReID's loader (resize to the test size as its test transforms do).
    grid = patch_grid(model.backbone)
    expected, expected_read = [], []
    for path, mask in zip(paths, measurer.person_masks(paths)):
        if mask is None:
            continue
        height, width = cfg.INPUT.SIZE_TEST
        image = np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC))
        image = torch.from_numpy(image.copy()).permute(2, 0, 1).float()
        # The default map's inputs: the encoder's last-block CLS attention (prior), the patch tokens
        # before its last block (keys).
        visual = model.backbone(model.preprocess_image(image[None]), None, with_tokens=True, with_cls_attention=True,
                                with_penultimate_tokens=True)
        query = model.text.simple(1, model.device)[:, None]
        inputs = dict(log_prior=visual.log_cls_attention, map_keys=visual.penultimate_tokens)
        weights = model.heads.mim.cross_attention_weights(query, visual.tokens, visual.embedding, **inputs)[0][0, 0]
        coverage = patch_coverage(mask_at_input(mask, cfg), grid).flatten()
        expected.append(float((weights.mean(dim=0) * coverage).sum()))
        # where the feature looks: v's row of the last MIM block, head mean over the patch keys, renormalised
        read = model.heads.mim.read_attention_weights(query, visual.tokens, visual.embedding, **inputs)[-1][0, :, 1:]
        read = read / read.sum(dim=-1, keepdim=True)
        expected_read.append(float((read.mean(dim=0) * coverage).sum()))
    assert shares["images_with_person"] == len(expected) > 0
    assert shares["attention_share"] == pytest.approx(sum(expected) / len(expected), abs=2e-3)
    assert shares["read_share"] == pytest.approx(sum(expected_read) / len(expected_read), abs=2e-3)


def test_figures_are_the_differences_the_targets_read():
    measured = {"simplified": {"mAP": 60.0}, "composed": {"mAP": 61.5}, "other_identity": {"mAP": 57.0},
                "no_person": {"mAP": 59.25}, "own_words": {"mAP": 62.0}, "other_words": {"mAP": 60.0},
                "attention_share": 0.7, "read_share": 0.75, "baseline_last_block_share": 0.65,
                "no_person_prompt": "A photo of a car."}
    figures = guidance.guidance_figures(measured)
    assert figures == pytest.approx({"simplified_mAP": 60.0, "composed_minus_simplified": 1.5,
                                     "other_identity_drop": 4.5, "no_person_change": -0.75,
                                     "own_words_change": 0.5, "other_words_change": -1.5, "attention_share": 0.7,
                                     "read_share": 0.75,
                                     "baseline_last_block_share": 0.65, "attention_margin": 0.05})
