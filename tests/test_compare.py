"""tools/compare.py on tiny trained runs (a PromptSG run with its composed-prompt evaluation beside
it, and a FastReID BoT run): the table holds each run's own metrics, the inference model's parameter
count and a PNG plot; FLOPs (promptsg.analysis.flops) against hand counts; the speed harness
(promptsg.analysis.speed) on a clock of its own; bad run folders fail in one line."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

import promptsg  # noqa: F401  (patches FastReID for this stack)
from promptsg.analysis import speed
from promptsg.analysis.compare import resolve_weights
from promptsg.analysis.flops import FlopCountError, count_flops
from promptsg.engine.preflight import InputError
from tiny_runs import BOT_CFG, PROMPTSG_CFG, ROOT, TINY, TRAIN_NET, load_tool, one_line_error


def load_compare_tool():
    return load_tool("tools/compare.py")


def read(path):
    with open(path) as f:
        return json.load(f)


def start(args, root):
    """tools/train_net.py ``args`` started in the background on the tiny split, one torch thread
    (two runs share the two cores)."""
    env = dict(os.environ, FASTREID_DATASETS=str(root), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, TRAIN_NET, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(process):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def runs(datasets_root, tmp_path_factory):
    """Tiny one-epoch runs as tools/run_synthetic.py lays them out: promptsg (simplified prompt),
    promptsg_composed (--eval-only of its checkpoint with the composed prompt), and bot; the BoT
    run trains while the PromptSG run trains and is evaluated."""
    out = tmp_path_factory.mktemp("logs")
    one_epoch = [*TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]
    bot = start(["--config-file", BOT_CFG, *one_epoch, "OUTPUT_DIR", str(out / "bot")], datasets_root)
    finish(start(["--config-file", PROMPTSG_CFG, *one_epoch, "OUTPUT_DIR", str(out / "promptsg")], datasets_root))
    finish(start(["--config-file", PROMPTSG_CFG, "--eval-only", *one_epoch, "MODEL.PROMPTSG.INFERENCE_PROMPT",
                  "composed", "MODEL.WEIGHTS", str(out / "promptsg" / "model_final.pth"),
                  "OUTPUT_DIR", str(out / "promptsg_composed")], datasets_root))
    finish(bot)
    return out


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    """compare.py on the PromptSG and BoT runs (its composed evaluation found beside it)."""
    output = tmp_path_factory.mktemp("compare")
    load_compare_tool().main([str(runs / "promptsg"), str(runs / "bot"), "--output", str(output),
                              "--batch-size", "4", "--warmup", "1", "--rounds", "2"])
    return output, read(output / "compare.json")["rows"]


def test_table_holds_each_runs_own_metrics_and_both_prompt_modes(runs, compared):
    output, rows = compared
    assert [r["run"] for r in rows] == ["promptsg", "promptsg_composed", "bot"]
    assert [r["model"] for r in rows] == ["PromptSG (tiny-ViT), simplified prompt", "PromptSG (tiny-ViT), composed prompt",
                                          "Baseline: resnet 18x, GlobalAvgPool"]
    expected = [read(runs / "promptsg" / "results.json"), read(runs / "promptsg_composed" / "eval_results.json"),
                read(runs / "bot" / "results.json")]
    table = (output / "compare.md").read_text().splitlines()
    for row, results in zip(rows, expected):
        for key in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"):
            assert row[key] == pytest.approx(results[key], abs=1e-6)
        line = next(line for line in table if line.startswith(f"| {row['run']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:8] == [f"{results[k]:.1f}" for k in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")]
        assert cells[2] == "64x32"
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0
    # The composed prompt runs the text tower on each image: more FLOPs than the simplified one,
    # whose prompt embedding is computed once.
    assert rows[1]["flops_per_image"] > rows[0]["flops_per_image"]


def test_parameters_are_the_inference_models_without_the_id_classifier(runs, compared):
    """sum(p.numel()) of the model as training built it, less the ID classifier's rows (read from
    the checkpoint), which evaluation does not use."""
    from fastreid.config import get_cfg
    from fastreid.engine import DefaultTrainer

    _, rows = compared
    for row in (rows[0], rows[2]):
        run_dir = runs / row["run"]
        cfg = promptsg.add_promptsg_config(get_cfg())
        cfg.merge_from_file(str(run_dir / "config.yaml"))
        assert cfg.MODEL.HEADS.NUM_CLASSES > 0
        model = DefaultTrainer.build_model(cfg)
        checkpoint = torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
        classifier = next(checkpoint[k] for k in ("heads.weight", "heads.classifier.weight") if k in checkpoint)
        assert classifier.shape[0] == cfg.MODEL.HEADS.NUM_CLASSES
        assert row["parameters"] == sum(p.numel() for p in model.parameters()) - classifier.numel()
    assert rows[1]["parameters"] == rows[0]["parameters"]        # the same model in the other prompt mode


def test_plot_is_a_png(compared):
    output, _ = compared
    with Image.open(output / "compare.png") as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200
        image.verify()


class ConvAttentionLinear(nn.Module):
    """conv 3->4 (3x3, padding 1) on 8x6, the 48 positions as tokens through 2-head attention
    (width 4), mean over tokens, then a linear layer 4->5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 5)

    def forward(self, batched_inputs):
        x = self.conv(batched_inputs["images"]).flatten(2).transpose(1, 2)          # (B, 48, 4)
        x, _ = self.attention(x, x, x, need_weights=False)
        return self.fc(x.mean(dim=1))


def test_flops_match_a_hand_count():
    """2 FLOPs per multiply-add: conv 2*(3*3*3)*4*48; attention in-projection 2*48*4*12, scores and
    weighted sum 2 * 2*48*48*4, out-projection 2*48*4*4; linear 2*4*5. In eval mode under no_grad
    nn.MultiheadAttention takes a fused path that FlopCounterMode alone counts as 0, and its CPU
    attention kernel has no formula in FlopCounterMode: both must be counted."""
    model = ConvAttentionLinear().eval()
    per_image = 2 * 27 * 4 * 48 + 2 * 48 * 4 * 12 + 2 * (2 * 48 * 48 * 4) + 2 * 48 * 4 * 4 + 2 * 4 * 5
    assert per_image == 53416
    for batch in (1, 3):
        inputs = {"images": torch.rand(batch, 3, 8, 6)}
        assert count_flops(model, inputs) == batch * per_image
    assert torch.backends.mha.get_fastpath_enabled()              # restored after counting


def test_speed_is_the_median_batch_and_the_ratio_is_paired_within_rounds(monkeypatch):
    """On a clock the models advance themselves: b takes twice a's time in each round while the
    machine's load changes from round to round, except for one spike that hits b alone; the
    warm-up batches are slow. The paired ratio ignores the spike; the ratio of medians would not."""
    clock = [0.0]
    seconds = {"a": [100.0, 1.0, 3.0, 1.5, 2.0], "b": [100.0, 2.0, 6.0, 3.0, 400.0]}

    class Timed(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, batched_inputs):
            clock[0] += seconds[self.name].pop(0)

    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    inputs = [{"images": torch.zeros(8, 3, 2, 2)}, {"images": torch.zeros(8, 3, 2, 2)}]
    per_second, relative = speed.measure_speed([Timed("a"), Timed("b")], inputs, warmup=1, rounds=4)
    assert per_second == pytest.approx([8 / 1.75, 8 / 4.5])      # medians of the timed batches
    assert relative == pytest.approx([1.0, 0.5])                 # median of 1/2, 1/2, 1/2, 1/200 (not 0.39)


def test_a_matrix_product_without_a_flop_formula_is_an_error():
    class MatrixVector(nn.Module):
        def forward(self, batched_inputs):
            return torch.mv(batched_inputs["images"].flatten(1), torch.ones(12))

    with pytest.raises(FlopCountError, match="aten.mv"):
        count_flops(MatrixVector(), {"images": torch.rand(2, 3, 2, 2)})


def test_relative_weights_of_a_moved_run_are_found_from_where_it_started(tmp_path):
    """tools/run_synthetic.py's composed evaluation names its checkpoint relative to the folder it
    was started from: a copy of logs/ elsewhere still finds it."""
    from fastreid.config import CfgNode

    run_dir = tmp_path / "copy" / "logs" / "synthetic" / "promptsg_composed"
    weights = "logs/synthetic/promptsg/model_final.pth"
    cfg = CfgNode({"MODEL": CfgNode({"WEIGHTS": weights}), "OUTPUT_DIR": "logs/synthetic/promptsg_composed"})
    assert resolve_weights(str(run_dir), cfg) == weights       # not there: as given
    expected = tmp_path / "copy" / weights
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    assert resolve_weights(str(run_dir), cfg) == str(expected)
    cfg.OUTPUT_DIR = "elsewhere/promptsg_composed"                   # the folder renamed: as given
    assert resolve_weights(str(run_dir), cfg) == weights


def test_a_folder_without_results_is_one_line_naming_it(runs, tmp_path, monkeypatch, capsys):
    """Run as a script: exit with one line ``error: ...`` naming the folder, before any model is built."""
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs / "bot" / "config.yaml", unfinished / "config.yaml")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compare.py"), str(runs / "bot"),
                             str(unfinished), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    message = one_line_error(result)
    assert str(unfinished) in message and "no results.json" in message, message
    assert "timing" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_build_is_one_line_naming_it(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs / "bot", broken)
    config = (broken / "config.yaml").read_text()
    assert "DEPTH: 18x" in config
    (broken / "config.yaml").write_text(config.replace("DEPTH: 18x", "DEPTH: 7x"))
    with pytest.raises(InputError, match="^" + re.escape(f"{broken / 'config.yaml'}: the model does not build")):
        load_compare_tool().main([str(broken), "--output", str(tmp_path / "out")])
