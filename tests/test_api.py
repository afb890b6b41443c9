"""The Python API (``promptsg.load``, ``Run.embed``, ``Run.search``) against tools/extract_features.py
on the same images: identical features, rankings and distances, from a tiny one-epoch training run."""
import json

import numpy as np
import pytest

import promptsg
from promptsg.engine.preflight import InputError

from tiny_runs import PROMPTSG_CFG, TINY, load_extract_tool, run

WORDS = "carrying a red backpack"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_root):
    """A one-epoch tiny PromptSG run (composed prompt at test, so words can join a query)."""
    out = tmp_path_factory.mktemp("run")
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
                  "SOLVER.CHECKPOINT_PERIOD", "1", "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed",
                  "OUTPUT_DIR", str(out)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def folders(datasets_root):
    split = datasets_root / "SyntheticMarketTiny"
    return split / "query", split / "bounding_box_test"


def tool_output(trained, tmp_path, *args):
    """tools/extract_features.py on the run's checkpoint, with the training command's config."""
    out = tmp_path / "tool"
    load_extract_tool().main(["--config-file", PROMPTSG_CFG, *args, "--output", str(out), *TINY,
                              "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed",
                              "MODEL.WEIGHTS", str(trained / "model_final.pth")])
    return out


def test_embed_gives_the_tool_s_features(trained, datasets_root, tmp_path):
    query, _ = folders(datasets_root)
    model = promptsg.load(str(trained))
    features = model.embed(str(query))
    out = tool_output(trained, tmp_path, "--images", str(query))
    np.testing.assert_array_equal(features, np.load(out / "features.npy"))
    assert (out / "images.txt").read_text().split() == sorted(str(p) for p in query.iterdir())
    # a list of paths keeps its order; each image's row is the folder's row (to float rounding:
    # a batch of two runs other CPU kernels than a batch of 64)
    paths = sorted(str(p) for p in query.iterdir())
    np.testing.assert_allclose(model.embed([paths[3], paths[0]]), features[[3, 0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("words", [None, WORDS])
def test_search_gives_the_tool_s_ranking(trained, datasets_root, tmp_path, words):
    query, gallery = folders(datasets_root)
    hits = promptsg.load(str(trained)).search(str(query), str(gallery), top_k=5, words=words)
    args = ["--query", str(query), "--images", str(gallery), "--top-k", "5"] + (["--text", words] if words else [])
    expected = json.loads((tool_output(trained, tmp_path, *args) / "ranking.json").read_text())
    assert [h["query"] for h in hits] == [e["query"] for e in expected]
    for h, e in zip(hits, expected):
        assert [t["image"] for t in h["top"]] == [t["image"] for t in e["top"]]
        np.testing.assert_allclose([t["distance"] for t in h["top"]], [t["distance"] for t in e["top"]], rtol=0,
                                   atol=0)
        assert h.get("prompt") == e.get("prompt")
    if words:
        assert hits[0]["prompt"].endswith(f"person {WORDS}.")


def test_search_ranks_as_a_plain_matrix_product_and_argsort(trained, datasets_root):
    """Independent of promptsg.inference's ranking code (which the tool shares): the embeddings'
    cosine distances, 1 - q g^T of the L2-normalised rows, sorted with NumPy."""
    query, gallery = folders(datasets_root)
    model = promptsg.load(str(trained))
    assert model.cfg.TEST.METRIC == "cosine"
    q, g = model.embed(str(query)).astype(np.float64), model.embed(str(gallery)).astype(np.float64)
    q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    distances = 1 - q @ g.T
    gallery_paths = sorted(str(p) for p in gallery.iterdir())
    hits = model.search(str(query), str(gallery), top_k=len(gallery_paths))
    assert [h["query"] for h in hits] == sorted(str(p) for p in query.iterdir())
    for row, hit in zip(distances, hits):
        got = {t["image"]: t["distance"] for t in hit["top"]}
        assert sorted(got) == gallery_paths                                 # every gallery image, once
        np.testing.assert_allclose([got[p] for p in gallery_paths], row, rtol=0, atol=1e-5)
        order = [gallery_paths.index(t["image"]) for t in hit["top"]]
        # the same order as argsort, up to images whose distances tie within float32 rounding
        np.testing.assert_allclose(row[order], np.sort(row), rtol=0, atol=1e-5)


def test_load_takes_a_config_and_weights_and_names_what_is_missing(trained, tmp_path, datasets_root):
    query, _ = folders(datasets_root)
    from_config = promptsg.load(str(trained / "config.yaml"), weights=trained / "model_final.pth")
    np.testing.assert_array_equal(from_config.embed(str(query)), promptsg.load(str(trained)).embed(str(query)))
    with pytest.raises(InputError, match="give the checkpoint too"):
        promptsg.load(str(trained / "config.yaml"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"config file not found: {empty / 'config.yaml'}"):
        promptsg.load(str(empty))
    with pytest.raises(InputError, match="no such file or folder"):
        promptsg.load(str(trained)).embed(str(tmp_path / "nowhere"))


def alter_one_tensor(source, target):
    """Copy the checkpoint ``source`` to ``target`` with one float of its largest tensor replaced by
    another finite value, the zip directory left intact (a flipped disk block, an edited file)."""
    import struct
    import zipfile

    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length + member.file_size // 2 // 4 * 4
    value = struct.unpack("<f", data[start:start + 4])[0]
    data[start:start + 4] = struct.pack("<f", value + 0.5)
    target.write_bytes(bytes(data))


def test_a_checkpoint_altered_inside_a_tensor_is_refused(trained, tmp_path, datasets_root):
    import torch

    altered = tmp_path / "run"
    altered.mkdir()
    (altered / "config.yaml").write_text((trained / "config.yaml").read_text())
    alter_one_tensor(trained / "model_final.pth", altered / "model_final.pth")
    good = torch.load(trained / "model_final.pth", weights_only=True)["model"]
    bad = torch.load(altered / "model_final.pth", weights_only=True)["model"]     # torch reads it without a word
    changed = [k for k in good if not torch.equal(good[k], bad[k])]
    assert len(changed) == 1 and torch.isfinite(bad[changed[0]]).all()
    with pytest.raises(InputError, match=r"model_final\.pth: its member .*/data/\d+ fails its CRC-32 check"):
        promptsg.load(str(altered))
    result = run(["--config-file", PROMPTSG_CFG, "--eval-only", *TINY, "MODEL.WEIGHTS",
                  str(altered / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "eval")], datasets_root)
    assert result.returncode != 0 and "fails its CRC-32 check" in result.stderr
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_search_errors_name_the_api_s_own_arguments(trained, tmp_path, datasets_root):
    """Run.search(words=...) on a model that cannot compose words, or with empty words, speaks of
    words=, not of the command line's --text, --query or --images."""
    import torch
    from fastreid.config import get_cfg
    from fastreid.engine import DefaultTrainer

    from tiny_runs import BASELINE_CFG

    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(BASELINE_CFG)
    cfg.merge_from_list([*TINY, "MODEL.DEVICE", "cpu", "MODEL.HEADS.NUM_CLASSES", "8"])
    weights = tmp_path / "baseline.pth"
    torch.save({"model": DefaultTrainer.build_model(cfg).state_dict()}, weights)
    query, gallery = folders(datasets_root)
    baseline = promptsg.load(BASELINE_CFG, weights=weights, opts=[*TINY, "MODEL.HEADS.NUM_CLASSES", "8"])
    with pytest.raises(InputError) as caught:
        baseline.search(str(query), str(gallery), words=WORDS)
    message = str(caught.value)
    assert message.startswith('Run.search(words=...) composes "A photo of a s* person <words>."'), message
    assert "no inversion network" in message and "no MIM" in message
    assert "--query" not in message and "--images" not in message, message
    assert message.count("--text") == message.count("tools/extract_features.py --text") == 1   # the tool to use
    with pytest.raises(InputError, match=r"^words=: the words are empty"):
        promptsg.load(str(trained)).search(str(query), str(gallery), words=" . ")


def test_the_sie_camera_must_be_a_training_camera(trained):
    """One check for the API, extract_features.py, export_onnx.py and attention_maps.py: 0 to
    NUM_CAMERAS - 1; the number of cameras itself is out of range."""
    from promptsg.engine.preflight import sie_camera

    sie = [*TINY, "MODEL.CLIP.SIE_CAMERA", "True", "MODEL.CLIP.NUM_CAMERAS", "6"]
    for camera in (6, -1, None):
        with pytest.raises(InputError, match=rf"give camera=, a training camera index in 0\.\.5 \(got {camera}\)"):
            promptsg.load(PROMPTSG_CFG, weights=trained / "model_final.pth", opts=sie, camera=camera)
    cfg = promptsg.load(str(trained)).cfg.clone()
    cfg.defrost()
    assert sie_camera(cfg, None) == 0                                   # no SIE: every image camera 0
    cfg.MODEL.CLIP.SIE_CAMERA, cfg.MODEL.CLIP.NUM_CAMERAS = True, 6
    assert sie_camera(cfg, 5) == 5
    with pytest.raises(InputError, match=r"give --camera, a training camera index in 0\.\.5 \(got 6\)"):
        sie_camera(cfg, 6)
