"""Nothing lost, nothing silently wrong: foreign and non-finite checkpoints, NaN training, image
modes, start-up checks, and the final model written before the final evaluation.

Each test fails without its fix: FastReID's Checkpointer loads a foreign checkpoint partially and
writes NaN weights, its read_image returns a palette PNG's indices as grey levels, and its
trainer evaluates before it writes model_final.pth.
"""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from fastreid.data import common, data_utils
from fastreid.engine import DefaultTrainer
from promptsg.engine.checkpoint import (AtomicCheckpointer, CheckpointError, NonFiniteError, check_finite_features,
                                        check_finite_losses, load_for_inference)
from promptsg.engine.preflight import InputError, verify_image, verify_images_cached

from tiny_runs import BASELINE_CFG, PROMPTSG_CFG, ROOT, TINY, one_line_error, run

TINY = TINY + ["SOLVER.CHECKPOINT_PERIOD", "1"]


def build(config, *opts, num_classes=5):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, "MODEL.HEADS.NUM_CLASSES", str(num_classes), "MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return DefaultTrainer.build_model(cfg)


def save(model, path):
    AtomicCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return path


# ---- checkpoints of another model ----

def test_checkpoint_of_another_model_is_refused_naming_the_file_and_keys(tmp_path):
    promptsg_model, baseline = build(PROMPTSG_CFG), build(BASELINE_CFG)
    promptsg_file = save(promptsg_model, tmp_path / "promptsg.pth")
    baseline_file = save(baseline, tmp_path / "baseline.pth")
    with pytest.raises(CheckpointError, match=r"baseline\.pth is not a checkpoint of this model \(config\): \d+ of the model.s tensors missing \(text\."):
        load_for_inference(build(PROMPTSG_CFG), str(baseline_file))
    with pytest.raises(CheckpointError, match=r"promptsg\.pth is not a checkpoint.*\d+ tensors the model does not have \(text\."):
        load_for_inference(build(BASELINE_CFG), str(promptsg_file))
    # another width of the same architecture: every tensor there, shapes differ
    with pytest.raises(CheckpointError, match=r"of another shape \(backbone\..*in the checkpoint"):
        load_for_inference(build(PROMPTSG_CFG, "MODEL.CLIP.NAME", "small-ViT", "MODEL.CLIP.STRIDE", "8"),
                           str(promptsg_file))


def test_checkpoint_of_another_or_a_removed_mim_fusion_is_refused_by_name(tmp_path):
    """The wiring a checkpoint was trained with travels in it (``fusion_index``, an index into
    FUSION_HISTORY): another fusion's checkpoint is refused naming both, one of a removed wiring
    naming it, and one older than the key is the removed query_residual."""
    fusion = lambda name: ("MODEL.PROMPTSG.MIM.FUSION", name)  # noqa: E731
    learned = build(PROMPTSG_CFG, *fusion("learned_map"))
    learned_file = save(learned, tmp_path / "learned.pth")
    with pytest.raises(CheckpointError, match=r"learned\.pth was trained with MODEL\.PROMPTSG\.MIM\.FUSION "
                                              r"learned_map, the config has attention: set MODEL\.PROMPTSG\."
                                              r"MIM\.FUSION learned_map"):
        load_for_inference(build(PROMPTSG_CFG, *fusion("attention")), str(learned_file))
    loaded = build(PROMPTSG_CFG, *fusion("learned_map"))
    load_for_inference(loaded, str(learned_file))
    for (name, a), b in zip(loaded.state_dict().items(), learned.state_dict().values()):
        assert torch.equal(a, b), name
    # "reweight" had the same parameters as learned_map, at index 3 of the history.
    state = learned.state_dict()
    state["heads.mim.fusion_index"] = torch.tensor(3)
    torch.save({"model": state}, tmp_path / "reweight.pth")
    with pytest.raises(CheckpointError, match=r"reweight\.pth was trained with MODEL\.PROMPTSG\.MIM\.FUSION reweight, "
                                              r"a wiring since removed"):
        load_for_inference(build(PROMPTSG_CFG, *fusion("learned_map")), str(tmp_path / "reweight.pth"))
    # A checkpoint written before the key existed has no fusion_index: it added the query back.
    del state["heads.mim.fusion_index"]
    torch.save({"model": state}, tmp_path / "older.pth")
    with pytest.raises(CheckpointError, match=r"older\.pth was trained with MODEL\.PROMPTSG\.MIM\.FUSION query_residual, "
                                              r"a wiring since removed"):
        load_for_inference(build(PROMPTSG_CFG, *fusion("learned_map")), str(tmp_path / "older.pth"))


# The map before the default's keys, prior and power (the checkpoints older than their keys).
PLAIN_MAP = ("MODEL.PROMPTSG.MIM.MAP_KEYS", "", "MODEL.PROMPTSG.MIM.MAP_PRIOR", "", "MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER",
             "1.0")


@pytest.mark.parametrize("option, value", [("MAP_PRIOR", "cls_attention"), ("MAP_KEYS", "penultimate")])
def test_checkpoint_of_another_map_prior_or_keys_is_refused_by_name(tmp_path, option, value):
    """MIM.MAP_PRIOR and MIM.MAP_KEYS travel in the checkpoint (``map_prior_index``, ``map_keys_index``):
    a model with the option is refused one without it and back, naming both; a checkpoint older than
    the key had none."""
    key, setting = f"MODEL.PROMPTSG.MIM.{option}", (*PLAIN_MAP, f"MODEL.PROMPTSG.MIM.{option}", value)
    pattern = re.escape(key)
    with_option = save(build(PROMPTSG_CFG, *setting), tmp_path / "option.pth")
    without = build(PROMPTSG_CFG, *PLAIN_MAP)
    plain = save(without, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=rf"option\.pth was trained with {pattern} '{value}', the config has '': "
                                              rf"set {pattern} '{value}'"):
        load_for_inference(build(PROMPTSG_CFG, *PLAIN_MAP), str(with_option))
    with pytest.raises(CheckpointError, match=rf"plain\.pth was trained with {pattern} '', the config has '{value}'"):
        load_for_inference(build(PROMPTSG_CFG, *setting), str(plain))
    load_for_inference(build(PROMPTSG_CFG, *setting), str(with_option))
    state = without.state_dict()
    del state[f"heads.mim.{'map_prior_index' if option == 'MAP_PRIOR' else 'map_keys_index'}"]
    torch.save({"model": state}, tmp_path / "older.pth")
    loaded = build(PROMPTSG_CFG, *PLAIN_MAP)
    load_for_inference(loaded, str(tmp_path / "older.pth"))
    for (name, a), b in zip(loaded.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match=rf"older\.pth was trained with {pattern} ''"):
        load_for_inference(build(PROMPTSG_CFG, *setting), str(tmp_path / "older.pth"))


@pytest.mark.parametrize("option, value", [("MAP_CONTRAST", "3.0"), ("MAP_PRIOR_POWER", "3.0")])
def test_checkpoint_of_another_map_contrast_or_prior_power_is_refused_by_name(tmp_path, option, value):
    """MIM.MAP_CONTRAST and MIM.MAP_PRIOR_POWER travel in the checkpoint (``map_scales``): another value
    would compute another feature from the same weights, so it is refused naming both values; a
    checkpoint older than the key had the values of its time (2 and 1: no power)."""
    key = f"MODEL.PROMPTSG.MIM.{option}"
    default = "2"                                # Base-PromptSG.yml's contrast and power
    changed = save(build(PROMPTSG_CFG, key, value), tmp_path / "changed.pth")
    plain_model = build(PROMPTSG_CFG)
    plain = save(plain_model, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=rf"changed\.pth was trained with {re.escape(key)} {value[0]}, the config "
                                              rf"has {default}: set {re.escape(key)} {value[0]} to evaluate"):
        load_for_inference(build(PROMPTSG_CFG), str(changed))
    with pytest.raises(CheckpointError, match=rf"plain\.pth was trained with {re.escape(key)} {default}, the config "
                                              rf"has {value[0]}"):
        load_for_inference(build(PROMPTSG_CFG, key, value), str(plain))
    load_for_inference(build(PROMPTSG_CFG, key, value), str(changed))
    unit_power = ("MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER", "1.0")
    state = build(PROMPTSG_CFG, *unit_power).state_dict()
    del state["heads.mim.map_scales"]
    torch.save({"model": state}, tmp_path / "older.pth")
    load_for_inference(build(PROMPTSG_CFG, *unit_power), str(tmp_path / "older.pth"))
    old_value = {"MAP_CONTRAST": "2", "MAP_PRIOR_POWER": "1"}[option]
    with pytest.raises(CheckpointError, match=rf"older\.pth was trained with {re.escape(key)} {old_value}, the config"):
        load_for_inference(build(PROMPTSG_CFG, key, value), str(tmp_path / "older.pth"))
    # The "attention" fusion has no map: its checkpoints load whatever the map's settings.
    attention = ("MODEL.PROMPTSG.MIM.FUSION", "attention")
    load_for_inference(build(PROMPTSG_CFG, *attention, "MODEL.PROMPTSG.MIM.MAP_CONTRAST", "3.0"),
                       str(save(build(PROMPTSG_CFG, *attention), tmp_path / "attention.pth")))


@pytest.mark.parametrize("removed", ["reweight", "query_residual", "visual_residual", "clip_map"])
def test_config_of_a_removed_fusion_is_one_line_naming_it(removed):
    with pytest.raises(ValueError, match=rf"^MODEL\.PROMPTSG\.MIM\.FUSION {removed} was removed \(docs/EXPERIMENTS\.md"):
        build(PROMPTSG_CFG, "MODEL.PROMPTSG.MIM.FUSION", removed)
    # A CLIP baseline has no MIM: its config.yaml, written when a removed fusion was the default, still loads.
    baseline = build(BASELINE_CFG, "MODEL.PROMPTSG.MIM.FUSION", removed)
    assert baseline.heads.mim is None


@pytest.mark.parametrize("fusion_name", ["learned_map"])
@pytest.mark.parametrize("cross, self_layers", [(2, 2), (1, 0)])
def test_a_map_fusion_needs_one_cross_layer_and_a_self_block(fusion_name, cross, self_layers):
    """The prompt's map biases v's row in the self-attention blocks after one cross-attention."""
    with pytest.raises(ValueError, match=rf"FUSION {fusion_name} needs MIM.CROSS_LAYERS 1 and MIM.SELF_LAYERS >= 1 "
                                         rf".*got {cross} and {self_layers}"):
        build(PROMPTSG_CFG, "MODEL.PROMPTSG.MIM.FUSION", fusion_name, "MODEL.PROMPTSG.MIM.CROSS_LAYERS", str(cross),
              "MODEL.PROMPTSG.MIM.SELF_LAYERS", str(self_layers))


def test_own_checkpoint_loads_whole_and_the_classifier_only_by_choice(tmp_path):
    trained = build(PROMPTSG_CFG, num_classes=5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)                             # differ from a fresh model's initialisation
    path = str(save(trained, tmp_path / "model_final.pth"))
    fresh = build(PROMPTSG_CFG, num_classes=5)
    AtomicCheckpointer(fresh).load(path)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # another number of identities: refused for training unless asked, left out for inference
    other = build(PROMPTSG_CFG, num_classes=7)
    with pytest.raises(CheckpointError, match="heads.classifier.weight.*MODEL.WEIGHTS_NEW_CLASSIFIER True"):
        AtomicCheckpointer(other).load(path)
    checkpointer = AtomicCheckpointer(other)
    checkpointer.skip_classifier = True
    before = other.heads.classifier.weight.clone()
    checkpointer.load(path)
    assert torch.equal(other.heads.classifier.weight, before)            # the new classifier is kept
    for (name, a), b in zip(other.state_dict().items(), trained.state_dict().values()):
        if name != "heads.classifier.weight":
            assert torch.equal(a, b), name                                 # everything else loaded
    load_for_inference(build(PROMPTSG_CFG, num_classes=0), path)          # --eval-only builds 0 rows


def test_a_checkpoint_without_the_classifier_needs_weights_new_classifier():
    """By hand, on state dicts: the ID classifier missing from the checkpoint is refused naming it,
    unless MODEL.WEIGHTS_NEW_CLASSIFIER (skip_classifier) leaves it out."""
    from promptsg.engine.checkpoint import check_compatible

    model = {"backbone.w": torch.zeros(2), "heads.classifier.weight": torch.zeros(5, 2)}
    checkpoint = {"backbone.w": torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"1 of the model's tensors missing \(heads.classifier.weight\).*"
                                              r"MODEL.WEIGHTS_NEW_CLASSIFIER True"):
        check_compatible("ck.pth", model, checkpoint, skip_classifier=False)
    assert check_compatible("ck.pth", model, checkpoint, skip_classifier=True) == ["heads.classifier.weight"]
    assert check_compatible("ck.pth", model, dict(model), skip_classifier=False) == []


def test_eval_only_with_a_foreign_checkpoint_fails_in_one_line(tmp_path, datasets_root):
    baseline_file = save(build(BASELINE_CFG), tmp_path / "baseline.pth")
    result = run(["--config-file", PROMPTSG_CFG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(baseline_file),
                  "OUTPUT_DIR", str(tmp_path / "eval")], datasets_root)
    one_line_error(result, str(baseline_file), "not a checkpoint of this model")
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_empty_truncated_and_foreign_files_are_one_line(tmp_path, datasets_root):
    good = save(build(PROMPTSG_CFG), tmp_path / "good.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (empty, truncated):
        one_line_error(run(["--config-file", PROMPTSG_CFG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(bad)],
                           datasets_root), str(bad))
        one_line_error(run(["--config-file", PROMPTSG_CFG, *TINY, "MODEL.CLIP.PRETRAINED", str(bad)],
                           datasets_root), "MODEL.CLIP.PRETRAINED", str(bad))
    clip_file = tmp_path / "clip.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, clip_file)            # a CLIP state dict, not a checkpoint
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_for_inference(build(PROMPTSG_CFG), str(clip_file))


class _CreatesAFile:
    """Pickled as a call to ``open(path, "w")``: unpickling it creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unopened(tmp_path, datasets_root):
    state = build(PROMPTSG_CFG).state_dict()
    crafted = tmp_path / "crafted.pth"
    created = tmp_path / "created-by-unpickling"
    torch.save({"model": state, "epoch": _CreatesAFile(str(created))}, crafted)
    torch.load(crafted, weights_only=False)                      # the file does what it says when trusted ...
    assert created.exists()
    created.unlink()
    with pytest.raises(CheckpointError, match=r"crafted\.pth: not loaded: it holds an object of type io\.open, "
                                              r"which a FastReID checkpoint never holds"):
        load_for_inference(build(PROMPTSG_CFG), str(crafted))
    one_line_error(run(["--config-file", PROMPTSG_CFG, "--eval-only", *TINY, "MODEL.WEIGHTS", str(crafted),
                        "OUTPUT_DIR", str(tmp_path / "eval")], datasets_root), str(crafted), "io.open")
    assert not created.exists()                                  # ... and nothing ran here
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"random\.pth: not a torch checkpoint"):
        load_for_inference(build(PROMPTSG_CFG), str(random_bytes))


def test_a_checkpoint_of_numpy_arrays_still_loads(tmp_path):
    """FastReID converts NumPy arrays in a checkpoint to tensors: they are data, allowed."""
    model = build(PROMPTSG_CFG)
    path = tmp_path / "numpy.pth"
    torch.save({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "metric": np.float64(1.5)}, path)
    other = build(PROMPTSG_CFG)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    extra = load_for_inference(other, str(path))
    assert extra["metric"] == 1.5
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


# ---- non-finite weights, losses and features ----

def test_non_finite_weights_or_optimizer_state_are_never_written(tmp_path):
    model = build(PROMPTSG_CFG)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000")
    good = (tmp_path / "model_0000.pth").read_bytes()
    with torch.no_grad():
        model.heads.classifier.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model_0000\.pth: model\.heads\.classifier\.weight holds NaN"):
        checkpointer.save("model_0000")
    assert (tmp_path / "model_0000.pth").read_bytes() == good            # the last good one is kept
    assert not (tmp_path / "model_0000.pth.tmp").exists()
    with torch.no_grad():
        model.heads.classifier.weight[0, 0] = 0.0
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.state[model.heads.classifier.weight]["exp_avg"] = torch.full((1,), float("inf"))
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path), optimizer=optimizer)
    with pytest.raises(NonFiniteError, match=r"optimizer\.state\..*exp_avg holds NaN or infinity"):
        checkpointer.save("model_0001")
    assert not (tmp_path / "model_0001.pth").exists()


def test_a_checkpoint_holding_nan_is_refused_on_load(tmp_path):
    model = build(PROMPTSG_CFG)
    state = model.state_dict()
    state["heads.classifier.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)                                    # as FastReID would have written it
    with pytest.raises(CheckpointError, match=r"nan\.pth: .* holds NaN or infinity"):
        load_for_inference(build(PROMPTSG_CFG), str(path))


def test_the_loss_check_names_the_first_non_finite_terms():
    check_finite_losses(3, {"loss_cls": torch.tensor(1.0), "loss_supcon": torch.tensor(2.0)})
    with pytest.raises(NonFiniteError, match=r"iteration 7: loss_supcon not finite \(the other terms are finite"):
        check_finite_losses(7, {"loss_cls": torch.tensor(1.0), "loss_supcon": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteError, match=r"iteration 9: loss_cls, loss_supcon not finite \(every term at once: "
                                             r"the weights became non-finite in the update of iteration 8"):
        check_finite_losses(9, {"loss_cls": torch.tensor(float("nan")), "loss_supcon": torch.tensor(float("nan"))})


def test_non_finite_features_give_no_metric():
    check_finite_features(torch.randn(4, 3))
    features = torch.randn(5, 3)
    features[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 of 5 features hold NaN or infinity \(first: row 3\)"):
        check_finite_features(features)
    from promptsg.engine.evaluation import ChunkedReidEvaluator as ReidEvaluator

    cfg = promptsg.add_promptsg_config(get_cfg())
    evaluator = ReidEvaluator(cfg, num_query=2)
    evaluator.reset()
    evaluator._predictions = [{"feats": features, "pids": torch.arange(5), "camids": torch.arange(5)}]
    with pytest.raises(NonFiniteError, match="test features"):
        evaluator.evaluate()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, datasets_root):
    """The learning rate rises by 10 per iteration (a warm-up towards 1e6): Adam's second moments
    overflow in the second epoch, before any loss is NaN. FastReID wrote that state and evaluated
    it; here the checkpoint is refused, training stops, and the checkpoints before stay good."""
    out = tmp_path / "run"
    result = run(["--config-file", BASELINE_CFG, *TINY, "SOLVER.MAX_EPOCH", "8", "SOLVER.BASE_LR", "1000000.0",
                  "SOLVER.WARMUP_ITERS", "100000", "SOLVER.WARMUP_FACTOR", "0.000000001", "TEST.EVAL_PERIOD", "8",
                  "OUTPUT_DIR", str(out)], datasets_root)
    last = one_line_error(result, before_training=False)
    assert "holds NaN or infinity" in last or "not finite" in last, last
    written = sorted(p.name for p in out.glob("*.pth"))
    assert written and "model_final.pth" not in written, written
    assert (out / (out / "last_checkpoint").read_text().strip()).exists()
    for name in written:                                                  # whatever was written is finite
        state = torch.load(out / name, map_location="cpu", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), name
        moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
        assert moments and all(torch.isfinite(t).all() for t in moments), name


# ---- images: every mode read as RGB, truncated files found at start-up ----

def _image(mode):
    """(PIL image of ``mode``, the RGB value its first pixel must read as), the expectation
    computed from the mode's definition, not by PIL's conversion."""
    if mode == "P":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 153, 51, 51] + [0] * 762)
        return image, (153, 51, 51)
    if mode == "P+tRNS":                                                    # a palette with a transparent entry
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        image.info["transparency"] = 0
        return image, (10, 200, 30)
    if mode == "RGBA":
        return Image.new("RGBA", (4, 4), (20, 40, 60, 0)), (20, 40, 60)    # alpha dropped
    if mode == "LA":
        return Image.new("LA", (4, 4), (90, 128)), (90, 90, 90)
    if mode == "CMYK":
        return Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)     # no cyan, full magenta + yellow = red
    if mode == "I;16":
        image = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
        return image, (round(40000 / 257),) * 3                              # 65535 -> 255
    if mode == "L":
        return Image.new("L", (4, 4), 77), (77, 77, 77)
    if mode == "1":
        return Image.new("1", (4, 4), 1), (255, 255, 255)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["P", "P+tRNS", "RGBA", "LA", "CMYK", "I;16", "L", "1"])
def test_every_image_mode_is_read_as_rgb(tmp_path, mode):
    image, expected = _image(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    image.save(path, **({"transparency": 0} if mode == "P+tRNS" else {}))
    read = common.read_image(str(path))
    assert read.mode == "RGB" and read.size == (4, 4)
    assert read.getpixel((0, 0)) == expected
    assert data_utils.read_image is common.read_image
    if mode == "P":   # FastReID's own read gives the palette index as a grey level
        original = data_utils.read_image.fastreid_read_image(str(path))
        assert original.getpixel((0, 0)) != expected


def test_a_16_bit_image_uses_its_full_range():
    from promptsg.engine.compat import image_to_rgb

    ramp = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    assert [image_to_rgb(ramp).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_truncated_jpeg_fails_verification_and_reading_naming_the_file(tmp_path):
    path = tmp_path / "person.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(path, quality=95)
    verify_image(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()                                  # what the start-up check used to run: passes
    with pytest.raises(InputError, match=str(path)):
        verify_image(str(path))
    with pytest.raises(OSError, match=str(path)):
        common.read_image(str(path))


def test_verified_images_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    import promptsg.engine.preflight as preflight

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i, i, i)).save(path)
        paths.append(str(path))
    decoded = []
    real = preflight.verify_image
    monkeypatch.setattr(preflight, "verify_image", lambda p: (decoded.append(p), real(p)))
    verify_images_cached(paths, str(tmp_path / "cache"))
    verify_images_cached(paths, str(tmp_path / "cache"))
    assert sorted(decoded) == sorted(paths)                         # the second pass decodes nothing
    Image.new("RGB", (9, 8)).save(paths[1])                         # changed: decoded again
    os.utime(paths[1], ns=(1, 1))
    verify_images_cached(paths, str(tmp_path / "cache"))
    assert sorted(decoded) == sorted(paths + [paths[1]])


def test_an_image_changed_at_the_same_size_is_checked_again(tmp_path):
    """The cache keys an image by size and modification time: a file corrupted in place (same
    size, new time) is decoded again and named."""
    path = tmp_path / "a.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path, quality=90)
    cache = str(tmp_path / "cache")
    verify_images_cached([str(path)], cache)
    size = path.stat().st_size
    path.write_bytes(b"\x00" * size)                                      # overwritten in place: same size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert path.stat().st_size == size
    with pytest.raises(InputError, match=str(path)):
        verify_images_cached([str(path)], cache)


def test_truncated_gallery_and_training_images_are_found_at_start_up(tmp_path, datasets_root):
    from promptsg.engine.preflight import check_datasets

    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list(TINY)
    for split in ("bounding_box_test", "bounding_box_train"):
        root = tmp_path / split
        shutil.copytree(datasets_root, root)
        victim = sorted((root / "SyntheticMarketTiny" / split).glob("*.jpg"))[-1]
        victim.write_bytes(victim.read_bytes()[:300])
        with pytest.raises(InputError, match=str(victim)):
            check_datasets(cfg, str(root), cache_dir=str(tmp_path / "cache"))


def test_rng_states_restore_torch_numpy_and_python():
    """``--resume`` restores the three generators a run draws from: the same draws follow."""
    import random

    from promptsg.engine.checkpoint import rng_state, set_rng_state

    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]


def test_image_check_cache_lives_in_promptsg_cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    monkeypatch.setenv("PROMPTSG_CACHE_DIR", str(tmp_path / "elsewhere"))
    verify_images_cached([str(path)])
    written = os.listdir(tmp_path / "elsewhere")
    assert len(written) == 1 and written[0].startswith("verified-images-") and written[0].endswith(".json")
    monkeypatch.delenv("PROMPTSG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    verify_images_cached([str(path)])
    assert os.listdir(tmp_path / "home" / ".cache" / "promptsg") == written


# ---- start-up checks: one line, before anything is built ----

@pytest.mark.parametrize("key,value", [("TEST.METRIC", "foo"), ("MODEL.PROMPTSG.INFERENCE_PROMPT", "both"),
                                       ("MODEL.LOSSES.NAME", '("CrossEntropyLoss", "ArcLoss")'),
                                       ("MODEL.CLIP.NAME", "ViT-Q-99")])
def test_bad_config_values_fail_at_start_up(tmp_path, key, value):
    result = run(["--config-file", PROMPTSG_CFG, key, value], tmp_path)
    one_line_error(result, key, value.strip('()"').split('", "')[-1])
    assert "Loading checkpoint" not in result.stderr + result.stdout


def test_bad_metric_for_a_fastreid_baseline_fails_at_start_up(tmp_path):
    result = run(["--config-file", os.path.join(ROOT, "configs/Synthetic/bagtricks_R18.yml"), "TEST.METRIC", "l1"],
                 tmp_path)
    one_line_error(result, "TEST.METRIC", "l1")


def test_unwritable_output_dir_and_missing_msmt17_are_one_line(tmp_path, datasets_root):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(run(["--config-file", PROMPTSG_CFG, *TINY, "OUTPUT_DIR", str(blocker / "out")], datasets_root),
                   "OUTPUT_DIR", str(blocker / "out"))
    one_line_error(run(["--config-file", os.path.join(ROOT, "projects/PromptSG/configs/MSMT17/vit.yml")], tmp_path),
                   "MSMT17", str(tmp_path))


def test_truncated_query_image_is_found_at_start_up(tmp_path, datasets_root):
    root = tmp_path / "copy"
    shutil.copytree(datasets_root, root)
    victim = sorted((root / "SyntheticMarketTiny" / "query").glob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "OUTPUT_DIR", str(tmp_path / "out")], root)
    one_line_error(result, str(victim))


# ---- an error in the final evaluation keeps the trained model ----

def test_the_final_model_is_written_before_the_final_evaluation(tmp_path, datasets_root, monkeypatch):
    import fastreid.data.build as data_build

    from promptsg.engine.trainer import Trainer

    monkeypatch.setattr(data_build, "_root", str(datasets_root))
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list([*TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1",
                         "OUTPUT_DIR", str(tmp_path)])

    def failing_test(cls, cfg, model):
        raise RuntimeError("corrupt query image found by the evaluation")

    monkeypatch.setattr(Trainer, "test", classmethod(failing_test))
    trainer = Trainer(cfg)
    with pytest.raises(RuntimeError, match="corrupt query image"):
        trainer.train()
    final = tmp_path / "model_final.pth"
    assert final.exists()
    fresh = Trainer.build_model(trainer.cfg)             # the trainer's: NUM_CLASSES set
    load_for_inference(fresh, str(final))
    for (name, a), b in zip(trainer.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


# ---- --resume ----

def test_resume_finds_the_newest_complete_checkpoint_without_last_checkpoint(tmp_path):
    from promptsg.engine.checkpoint import newest_checkpoint

    model = build(BASELINE_CFG)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    for name in ("model_0000", "model_0001", "model_0002"):
        checkpointer.save(name, epoch=int(name[-4:]))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"
    assert not list(tmp_path.glob("*.tmp"))                                # written by rename
    # killed mid-write of epoch 2 and before the tag: a truncated file, no last_checkpoint
    data = (tmp_path / "model_0002.pth").read_bytes()
    (tmp_path / "model_0002.pth").write_bytes(data[: len(data) // 3])
    (tmp_path / "last_checkpoint").unlink()
    assert checkpointer.has_checkpoint()
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "model_0001.pth")
    assert checkpointer.resume_or_load("", resume=True)["epoch"] == 1
    (tmp_path / "last_checkpoint").write_text("model_0002.pth")            # a tag naming the broken file
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0001.pth")


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, datasets_root):
    out = tmp_path / "run"
    args = ["--config-file", BASELINE_CFG, *TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
            "OUTPUT_DIR", str(out)]
    assert run(args, datasets_root).returncode == 0
    before = (out / "model_final.pth").stat().st_mtime_ns
    result = run(["--resume", *args], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"the run in {out} is complete (1 of 1 epochs); nothing to train" in result.stdout + result.stderr
    assert (out / "model_final.pth").stat().st_mtime_ns == before


def test_a_resumed_seeded_run_ends_exactly_as_the_uninterrupted_run(tmp_path, datasets_root):
    """PromptSG, 3 epochs, a checkpoint after each. The resumed run starts from a copy of the
    uninterrupted run's folder cut back to its first checkpoint (what a kill -9 after it leaves)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["--config-file", PROMPTSG_CFG, *TINY, "SOLVER.MAX_EPOCH", "3", "TEST.EVAL_PERIOD", "3",
            "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "3"]
    result = run([*args, "OUTPUT_DIR", str(whole)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    cut.mkdir()
    shutil.copy(whole / "model_0000.pth", cut / "model_0000.pth")
    (cut / "last_checkpoint").write_text("model_0000.pth")
    result = run(["--resume", *args, "OUTPUT_DIR", str(cut)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    expected, resumed = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert set(resumed.pop("timing")) == set(expected.pop("timing")) == {"train_seconds", "evaluation_seconds"}
    assert resumed == expected
    assert "resume: epoch 1, iteration" in result.stdout + result.stderr
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"] for d in (whole, cut))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
