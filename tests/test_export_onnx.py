"""tools/export_onnx.py (promptsg/export/): the ONNX graph of a model's retrieval feature, run by
onnxruntime, gives PyTorch's features at any batch size and FastReID's evaluation the same ranking."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import promptsg  # noqa: F401
from fastreid.engine import DefaultTrainer
from promptsg.export import onnx_export
from promptsg.engine.checkpoint import load_for_inference
from promptsg.engine.preflight import InputError, load_checkpoint_config
from tiny_runs import BASELINE_CFG, BOT_CFG, PROMPTSG_CFG, ROOT, TINY, load_tool, one_line_error

TOOL = os.path.join(ROOT, "tools", "export_onnx.py")
VOCABULARY = 49408   # rows of CLIP's token-embedding table


def load_export_tool():
    return load_tool("tools/export_onnx.py")


def random_checkpoint(config_file, opts, path, images):
    """A checkpoint of the model ``config_file`` + ``opts`` builds, with random weights (seed 0)
    and the visual encoder's BatchNorm statistics those of ``images``, as a trained model has
    them: with open_clip's initialisation alone the tiny ResNet's activations shrink layer by
    layer and every image gets nearly the same feature, which no comparison could tell apart."""
    cfg = load_checkpoint_config(config_file, [*opts, "MODEL.WEIGHTS", __file__])
    torch.manual_seed(0)
    model = DefaultTrainer.build_model(cfg)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None                      # the plain average over the batch
    if norms:
        model.backbone.train()
        with torch.no_grad():
            model.backbone(model.preprocess_image({"images": images.clone()}))
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def reference_model(config_file, opts):
    """The checkpoint of ``opts``' MODEL.WEIGHTS loaded into a freshly built model, in eval mode."""
    cfg = load_checkpoint_config(config_file, opts)
    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    return model.eval()


def pytorch_features(model, images, flip=False, camera=None):
    """The features FastReID's evaluation computes, written out independently of the tool: the
    model's eval forward on a batch dict, averaged with the mirrored images' with ``flip``."""
    def forward(x):
        inputs = {"images": x.clone()}
        if camera is not None:
            inputs["camids"] = torch.full((len(x),), camera)
        return model(inputs)

    with torch.no_grad():
        features = forward(images)
        if flip:
            features = (features + forward(images.flip(dims=[3]))) / 2
    return features.numpy()


def tiny_split_images(datasets_root, count, folder="query", size=(64, 32)):
    """``count`` images of the tiny split as FastReID's test transforms give them at ``size``."""
    from fastreid.data.transforms import build_transforms
    from PIL import Image

    cfg = load_checkpoint_config(PROMPTSG_CFG, [*TINY, "INPUT.SIZE_TEST", str(list(size)), "MODEL.WEIGHTS", __file__])
    transform = build_transforms(cfg, is_train=False)
    paths = sorted((datasets_root / "SyntheticMarketTiny" / folder).glob("*.jpg"))[:count]
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def training_images(datasets_root):
    return tiny_split_images(datasets_root, 32, "bounding_box_train")


def cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same_features(features, reference):
    """onnxruntime's features are PyTorch's: cosine >= 0.9999 per image, and close entry by entry."""
    assert features.shape == reference.shape
    cosine = cosine_rows(reference, features)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(features, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def initializer_elements(path):
    """(total elements of the graph's stored tensors, the shapes among them)."""
    tensors = onnx.load(path).graph.initializer
    return sum(int(np.prod(t.dims)) for t in tensors), [tuple(t.dims) for t in tensors]


# (overrides, flip test): tiny-ViT with the simplified prompt and the flip test (the default map:
# penultimate keys, CLS-attention prior, power 2); tiny-RN with the composed prompt (its map from the
# final patch tokens, no prior: a ResNet has neither, as in the rn50 configs).
PROMPTSG_CASES = {
    "tiny-ViT-simplified": (["MODEL.CLIP.NAME", "tiny-ViT"], True),
    "tiny-RN-composed": (["MODEL.CLIP.NAME", "tiny-RN", "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed",
                          "MODEL.PROMPTSG.MIM.MAP_KEYS", "", "MODEL.PROMPTSG.MIM.MAP_PRIOR", ""], False),
}


@pytest.mark.parametrize("case", PROMPTSG_CASES)
def test_promptsg_graph_gives_pytorchs_features_at_any_batch_size_and_the_same_ranking(case, datasets_root,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREID_DATASETS", str(datasets_root))
    overrides, flip = PROMPTSG_CASES[case]
    opts = [*TINY, *overrides, "TEST.FLIP.ENABLED", str(flip)]
    weights = random_checkpoint(PROMPTSG_CFG, opts, tmp_path / "model.pth", training_images(datasets_root))
    output = str(tmp_path / "model.onnx")
    result = load_export_tool().main(["--config-file", PROMPTSG_CFG, "--weights", weights, "--output", output,
                               "--evaluate", *opts])
    assert result["cosine"] >= onnx_export.MIN_COSINE
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.pth"]          # no temporary file left

    # Batch sizes other than the export's (2) and the tool's check (3): the axis is dynamic.
    sess = onnx_export.session(output)
    assert sess.get_inputs()[0].shape[0] == sess.get_outputs()[0].shape[0] == "batch"
    model = reference_model(PROMPTSG_CFG, [*opts, "MODEL.WEIGHTS", weights])
    images = tiny_split_images(datasets_root, 7)
    for batch in (1, 7):
        reference = pytorch_features(model, images[:batch], flip)
        assert reference.shape == (batch, 64)                                    # tiny CLIPs' joint width
        assert_same_features(onnx_export.run(sess, images[:batch]), reference)

    # FastReID's evaluation of the graph ranks the tiny split's gallery as PyTorch's does.
    (pt, pt_ranked), (ox, ox_ranked) = result["runs"]["pytorch"], result["runs"]["onnx"]
    assert np.ptp(pt_ranked["dist"]) > 1e-2                # the images get distinct features
    np.testing.assert_array_equal(np.argsort(pt_ranked["dist"], axis=1, kind="stable"),
                                  np.argsort(ox_ranked["dist"], axis=1, kind="stable"))
    assert ox["mAP"] == pytest.approx(pt["mAP"], abs=1e-6) and ox["Rank-1"] == pt["Rank-1"]

    # What the graph holds of the text side: never the token-embedding table; with the
    # simplified prompt no text encoder at all (its weights would outnumber the rest).
    stored, shapes = initializer_elements(output)
    assert not any(VOCABULARY in shape for shape in shapes)
    text_encoder = sum(p.numel() for p in model.text.parameters()) - model.text.token_embedding.weight.numel()
    rest = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("text."))
    if "simplified" in case:
        assert stored < rest + text_encoder // 2, (stored, rest, text_encoder)
    else:
        assert stored >= text_encoder, (stored, text_encoder)


# The CLIP baseline, with SIE: every image gets the camera embedding of --camera.
BASELINE_OPTS = [*TINY, "MODEL.CLIP.SIE_CAMERA", "True", "MODEL.CLIP.NUM_CAMERAS", "6"]


@pytest.fixture(scope="module")
def baseline(datasets_root, tmp_path_factory):
    """A random CLIP baseline's checkpoint and its graph, written by the tool."""
    folder = tmp_path_factory.mktemp("baseline")
    weights = random_checkpoint(BASELINE_CFG, BASELINE_OPTS, folder / "model.pth", training_images(datasets_root))
    output = str(folder / "model.onnx")
    load_export_tool().main(["--config-file", BASELINE_CFG, "--output", output, "--camera", "2", *BASELINE_OPTS,
                      "MODEL.WEIGHTS", weights])
    return {"weights": weights, "output": output}


def test_clip_baseline_with_sie_exports_with_pytorchs_features(baseline, datasets_root):
    model = reference_model(BASELINE_CFG, [*BASELINE_OPTS, "MODEL.WEIGHTS", baseline["weights"]])
    images = tiny_split_images(datasets_root, 5)
    reference = pytorch_features(model, images, camera=2)
    assert_same_features(onnx_export.run(onnx_export.session(baseline["output"]), images), reference)
    assert np.abs(reference - pytorch_features(model, images, camera=3)).max() > 1e-3   # the camera matters


def test_fastreid_bot_r18_exports_with_pytorchs_features(datasets_root, tmp_path):
    opts = ["INPUT.SIZE_TEST", "[64, 32]", "INPUT.SIZE_TRAIN", "[64, 32]"]
    weights = random_checkpoint(BOT_CFG, opts, tmp_path / "model.pth", training_images(datasets_root))
    output = str(tmp_path / "model.onnx")
    load_export_tool().main(["--config-file", BOT_CFG, "--output", output, *opts, "MODEL.WEIGHTS", weights])
    images = tiny_split_images(datasets_root, 5)
    reference = pytorch_features(reference_model(BOT_CFG, [*opts, "MODEL.WEIGHTS", weights]), images)
    assert reference.shape == (5, 512)                                           # ResNet-18's channels
    assert_same_features(onnx_export.run(onnx_export.session(output), images), reference)


def test_a_graph_that_disagrees_with_pytorch_is_refused_and_nothing_is_written(baseline, tmp_path, monkeypatch):
    """The check runs the written graph beside the model: a graph that does not compute the
    model (here the baseline's graph for a checkpoint whose projection was changed since) is
    refused in one line, and neither the .onnx file nor its temporary file is left."""
    tool = load_export_tool()
    state = torch.load(baseline["weights"], weights_only=True)
    state["model"]["backbone.visual.proj"] += torch.randn_like(state["model"]["backbone.visual.proj"])
    torch.save(state, tmp_path / "changed.pth")
    monkeypatch.setattr(onnx_export, "export", lambda graph, images, path: shutil.copy(baseline["output"], path))
    output = tmp_path / "model.onnx"
    with pytest.raises(onnx_export.ExportError, match=r"^onnxruntime disagrees with PyTorch: min cosine "
                                                      r"-?\d\.\d+ < 0\.9999 over 3 images "
                                                      r"\(max abs difference .*\); nothing written$"):
        tool.main(["--config-file", BASELINE_CFG, "--output", str(output), "--camera", "2", *BASELINE_OPTS,
                   "MODEL.WEIGHTS", str(tmp_path / "changed.pth")])
    assert sorted(os.listdir(tmp_path)) == ["changed.pth"]


def test_nan_features_from_onnxruntime_fail_the_agreement_check(monkeypatch):
    """A NaN compares false with everything: one NaN row must fail the check, not pass it."""
    from fastreid.config import get_cfg

    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list(TINY)
    graph = lambda images: torch.ones(len(images), 8)                     # noqa: E731  (PyTorch's features)
    for bad_rows in (slice(None), slice(1, 2)):
        features = np.ones((3, 8), np.float32)
        features[bad_rows] = np.nan
        monkeypatch.setattr(onnx_export, "run", lambda sess, images, f=features: f)
        with pytest.raises(onnx_export.ExportError, match=r"min cosine nan < 0\.9999 over 3 images"):
            onnx_export.check_agreement(cfg, graph, None, 3)
    monkeypatch.setattr(onnx_export, "run", lambda sess, images: np.ones((3, 8), np.float32))
    difference, cosine, width = onnx_export.check_agreement(cfg, graph, None, 3)
    assert difference == 0.0 and cosine == pytest.approx(1.0, abs=1e-12) and width == 8


def test_bad_input_fails_in_one_line_before_the_model_is_built(tmp_path, monkeypatch):
    tool = load_export_tool()
    monkeypatch.setattr(DefaultTrainer, "build_model", lambda cfg: pytest.fail("the model was built"))
    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path / "no_datasets"))
    weights = tmp_path / "model.pth"          # never read: every check comes first
    weights.write_bytes(b"checkpoint")
    (tmp_path / "a_file").write_text("")
    missing = str(tmp_path / "missing.pth")
    cases = [   # (flags, config overrides, the message)
        (["--weights", missing], [], "MODEL.WEIGHTS file not found: " + missing),
        ([], ["MODEL.CLIP.SIE_CAMERA", "True", "MODEL.CLIP.NUM_CAMERAS", "6"],
         "MODEL.CLIP.SIE_CAMERA is on: give --camera, a training camera index in 0..5 (got None)"),
        (["--output", str(tmp_path / "a_file" / "model.onnx")], [],
         "--output folder " + str(tmp_path / "a_file") + " is not writable"),
        (["--evaluate"], ["DATASETS.TESTS", '("Market1501",)'], "dataset Market1501: "),
    ]
    for flags, overrides, message in cases:
        output = [] if "--output" in flags else ["--output", str(tmp_path / "model.onnx")]
        given = [] if "--weights" in flags else ["--weights", str(weights)]
        with pytest.raises(InputError, match="^" + re.escape(message)):
            tool.main(["--config-file", PROMPTSG_CFG, *output, *given, *flags, *TINY, *overrides])
    assert sorted(os.listdir(tmp_path)) == ["a_file", "model.pth"]
    result = subprocess.run([sys.executable, TOOL, "--config-file", PROMPTSG_CFG, "--output", str(tmp_path / "m.onnx")],
                            env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    one_line_error(result, "MODEL.WEIGHTS is not set")



VIT_B16_CFG = os.path.join(ROOT, "projects/PromptSG/configs/Market1501/vit.yml")


@pytest.mark.slow
def test_vit_b16_graph_gives_pytorchs_features_and_the_same_ranking(datasets_root, tmp_path):
    """PromptSG as configured for Market-1501 (ViT-B/16 at 256x128, simplified prompt), random
    weights: features at batch sizes 1 and 17, and the ranking of 12 gallery images of the tiny
    split for 5 queries by FastReID's cosine distance. About a minute of two CPU cores: marked slow."""
    from fastreid.utils.compute_dist import build_dist

    opts = ["MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.NUM_CAMERAS", "0"]
    weights = random_checkpoint(VIT_B16_CFG, opts, tmp_path / "model.pth", None)
    output = str(tmp_path / "model.onnx")
    load_export_tool().main(["--config-file", VIT_B16_CFG, "--weights", weights, "--output", output, *opts])

    model = reference_model(VIT_B16_CFG, [*opts, "MODEL.WEIGHTS", weights])
    split = {"query": 5, "bounding_box_test": 12}
    images = torch.cat([tiny_split_images(datasets_root, n, folder, size=(256, 128)) for folder, n in split.items()])
    sess = onnx_export.session(output)
    reference = pytorch_features(model, images)
    assert reference.shape == (17, 512)                                        # ViT-B/16's joint width
    assert_same_features(onnx_export.run(sess, images[:1]), reference[:1])
    features = onnx_export.run(sess, images)
    assert_same_features(features, reference)
    dist = {name: build_dist(torch.from_numpy(f[:5]), torch.from_numpy(f[5:]), "cosine")
            for name, f in (("onnx", features), ("pytorch", reference))}
    assert np.ptp(dist["pytorch"]) > 1e-3                  # the images get distinct features
    np.testing.assert_array_equal(np.argsort(dist["onnx"], axis=1, kind="stable"),
                                  np.argsort(dist["pytorch"], axis=1, kind="stable"))


def test_same_rankings_counts_queries_whose_order_agrees():
    from promptsg.export.onnx_evaluation import same_rankings

    a = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.5, 0.1]])
    b = np.array([[0.0, 0.5, 0.9], [0.2, 0.3, 0.1], [0.4, 0.6, 0.0]])
    # query 0: the same order; query 1: the same closest image, then swapped; query 2: the same order
    # (a's tie broken by position, as b orders them)
    assert same_rankings(a, b) == 2
    assert same_rankings(a, b, top=1) == 3
