"""tools/train_net.py end to end on the synthetic dataset: bad input, training, --eval-only,
and a FastReID BoT run whose loss falls; the tools that read its
checkpoints (visualize_result.py, extract_features.py)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer
from fastreid.utils.events import EventStorage

from tiny_runs import BOT_CFG, PROMPTSG_CFG, ROOT, TINY, load_extract_tool, market_ids, one_line_error, run


def read(path):
    with open(path) as f:
        return json.load(f)


# ---- bad input: one line naming the file or key, before any training ----

def test_missing_config_file(tmp_path):
    one_line_error(run(["--config-file", "nope/missing.yml"], tmp_path), "nope/missing.yml")


def test_unknown_config_key_in_file_and_on_command_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(f"_BASE_: {PROMPTSG_CFG}\nMODEL:\n  PROMPTSG:\n    MIM:\n      DEPTH: 3\n")
    one_line_error(run(["--config-file", str(bad)], tmp_path), str(bad), "MODEL.PROMPTSG.MIM.DEPTH")
    one_line_error(run(["--config-file", PROMPTSG_CFG, "SOLVER.LRR", "1"], tmp_path), "SOLVER.LRR")


def test_missing_weights_file(tmp_path):
    one_line_error(
        run(["--config-file", PROMPTSG_CFG, "--eval-only", "MODEL.WEIGHTS", "no/model.pth"], tmp_path), "no/model.pth")
    one_line_error(
        run(["--config-file", PROMPTSG_CFG, "MODEL.CLIP.PRETRAINED", "no/ViT-B-16.pt"], tmp_path), "no/ViT-B-16.pt")


def test_missing_dataset_folder(tmp_path):
    result = run(["--config-file", os.path.join(ROOT, "configs/Market1501/bagtricks_R50.yml")], tmp_path)
    one_line_error(result, "Market1501", str(tmp_path))


def test_corrupt_image_in_dataset(tmp_path, datasets_root):
    root = tmp_path / "copy"
    shutil.copytree(datasets_root, root)
    victim = sorted((root / "SyntheticMarketTiny" / "query").iterdir())[0]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    one_line_error(run(["--config-file", PROMPTSG_CFG, *TINY], root), str(victim))


# ---- training, evaluation and --eval-only ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_root):
    """Two short PromptSG runs, one evaluated with each prompt, and their checkpoints."""
    out = {}
    for mode in ("simplified", "composed"):
        out_dir = tmp_path_factory.mktemp(mode)
        result = run(["--config-file", PROMPTSG_CFG, *TINY, "MODEL.PROMPTSG.INFERENCE_PROMPT", mode,
                      "OUTPUT_DIR", str(out_dir)], datasets_root)
        assert result.returncode == 0, result.stderr[-3000:]
        out[mode] = out_dir
    return out


@pytest.mark.parametrize("mode", ["simplified", "composed"])
def test_eval_only_reproduces_the_training_run(trained, datasets_root, mode, tmp_path):
    train_dir = trained[mode]
    assert (train_dir / "model_final.pth").is_file()
    final = read(train_dir / "results.json")
    result = run(["--config-file", PROMPTSG_CFG, "--eval-only", *TINY, "MODEL.PROMPTSG.INFERENCE_PROMPT", mode,
                  "MODEL.WEIGHTS", str(train_dir / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    again = read(tmp_path / "eval_results.json")
    for key in ("mAP", "Rank-1", "Rank-5", "mINP"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key


def test_training_log_holds_the_alignment_diagnostics(trained):
    """metrics.json (and so tensorboard, from the same event storage) and log.txt carry them."""
    from promptsg.modeling.diagnostics import DIAGNOSTICS

    out_dir = trained["simplified"]
    records = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    training = [r for r in records if "loss_supcon" in r]
    assert training and all(set(DIAGNOSTICS) <= set(r) for r in training)
    log = (out_dir / "log.txt").read_text()
    line = re.compile(r"epoch/iter: \d+/\d+  " + "  ".join(rf"{k}: [-0-9.e]+" for k in DIAGNOSTICS))
    assert len(line.findall(log)) >= len(training)
    assert list(out_dir.glob("events.out.tfevents.*"))


# ---- tools/visualize_result.py ----

VISUALIZE = os.path.join(ROOT, "tools", "visualize_result.py")


def visualize(args, root):
    env = dict(os.environ, FASTREID_DATASETS=str(root), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, VISUALIZE, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_visualize_draws_the_ranking_that_eval_only_scores(trained, datasets_root, tmp_path):
    train_dir = trained["simplified"]
    result = visualize(["--config-file", PROMPTSG_CFG, "--output", str(tmp_path), "--num-vis", "3",
                        "--max-rank", "4", "--vis-label", *TINY, "MODEL.WEIGHTS", str(train_dir / "model_final.pth")],
                       datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read(train_dir / "results.json")
    again = read(tmp_path / "results.json")
    for key in ("mAP", "Rank-1", "mINP"):   # training scores in query chunks, visualize densely (FastReID)
        assert again[key] == pytest.approx(final[key], abs=1e-6), key
    for name in ("0.jpg", "1.jpg", "2.jpg", "roc.jpg", "pos_neg_dist.jpg", "roc_info.pickle"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "3.jpg").exists()
    lists = read(tmp_path / "rank_lists.json")
    assert len(lists) == 3 and [q["ap"] for q in lists] == sorted(q["ap"] for q in lists)  # worst first
    assert lists[0]["ap"] <= final["mAP"] / 100
    for query in lists:
        q_pid, q_cam = market_ids(query["query"])
        distances = [g["distance"] for g in query["top"]]
        assert len(query["top"]) == 4 and distances == sorted(distances)
        assert [g["rank"] for g in query["top"]] == [1, 2, 3, 4]
        for g in query["top"] + query["true"]:
            g_pid, g_cam = market_ids(g["image"])
            assert g["match"] == (g_pid == q_pid)               # labels from the file names
            assert not (g_pid == q_pid and g_cam == q_cam)      # same id, same camera: left out
        # --vis-label: the true matches, worst-ranked first (--label-sort ascending)
        assert query["true"] and all(g["match"] for g in query["true"])
        ranks = [g["rank"] for g in query["true"]]
        assert ranks == sorted(ranks, reverse=True)


def test_distance_labels_tell_close_distances_apart():
    from promptsg.analysis.visualize import distance_labels as labels

    # A model whose distances all lie near 1e-5 (FastReID's labels read 1.000 for each).
    close = [1.0e-5, 1.00004e-5, 1.2e-5, 3.1e-5]
    got = labels(close)
    assert len(set(got)) == 4
    assert [float(g) for g in got] == pytest.approx(close, rel=1e-5)
    assert labels([0.5, 0.25, 1.0]) == ["0.5", "0.25", "1"]     # at least 3 significant digits, no padding
    assert labels([0.1234, 0.1234]) == ["0.123", "0.123"]        # equal values may read equal


def test_distance_histogram_is_ranged_to_the_data():
    from promptsg.analysis.visualize import histogram_bins

    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(1e-6, 1e-5, 500), rng.uniform(5e-6, 3e-5, 5000)
    edges = histogram_bins(pos, neg)
    assert edges[0] == pos.min() and edges[-1] == neg.max() and len(edges) == 81
    counts, _ = np.histogram(np.concatenate([pos, neg]), bins=edges)
    assert counts.sum() == 5500 and (counts > 0).sum() > 40       # spread over the bins, not one
    edges = histogram_bins([0.2, 0.2], [0.2])                # all equal: a bin around the value
    assert edges[0] < 0.2 < edges[-1]


def test_visualize_without_weights_fails_in_one_line(tmp_path):
    result = visualize(["--config-file", PROMPTSG_CFG, "--output", str(tmp_path)], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: MODEL.WEIGHTS is not set")


def test_bot_baseline_loss_falls_over_a_short_run(datasets_root, monkeypatch, tmp_path):
    import fastreid.data.build as data_build

    monkeypatch.setattr(data_build, "_root", str(datasets_root))
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(BOT_CFG)
    cfg.merge_from_list(["DATASETS.NAMES", '("SyntheticMarketTiny",)', "DATASETS.TESTS", '("SyntheticMarketTiny",)',
                         "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "SOLVER.IMS_PER_BATCH", "16",
                         "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.001",
                         "INPUT.REA.ENABLED", "False", "OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(0)
    trainer = DefaultTrainer(cfg)
    losses = []
    with EventStorage(0) as trainer.storage:
        for trainer.iter in range(30):
            trainer.run_step()
            losses.append(trainer.storage.history("total_loss").latest())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


# ---- tools/extract_features.py ----

def test_extract_features_search_ranks_folders_as_the_evaluation_ranks_the_test_set(trained, datasets_root, tmp_path):
    """Query and gallery folders in, features and rankings out: the distances it ranks by give the
    training run's own mAP (Market protocol, labels read from the file names), and the ranking
    is what the saved features give under the cosine metric."""
    from fastreid.evaluation.rank import evaluate_rank

    tool = load_extract_tool()
    split = datasets_root / "SyntheticMarketTiny"
    train_dir = trained["composed"]
    query, gallery, dist = tool.main([
        "--config-file", PROMPTSG_CFG, "--query", str(split / "query"), "--images", str(split / "bounding_box_test"),
        "--output", str(tmp_path), "--top-k", "5", *TINY, "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed",
        "MODEL.WEIGHTS", str(train_dir / "model_final.pth")])

    query_paths = (tmp_path / "query_images.txt").read_text().split()
    gallery_paths = (tmp_path / "images.txt").read_text().split()
    assert gallery_paths == sorted(str(p) for p in (split / "bounding_box_test").glob("*.jpg"))
    assert len(query_paths) == len(query) == dist.shape[0] > 0
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), gallery)
    np.testing.assert_array_equal(np.load(tmp_path / "query_features.npy"), query)

    # Market-1501 protocol on the tool's distances: junk images (pid -1) leave the gallery.
    q_ids = np.array([market_ids(p) for p in query_paths])
    g_ids = np.array([market_ids(p) for p in gallery_paths])
    keep = g_ids[:, 0] != -1
    cmc, all_ap, _ = evaluate_rank(dist[:, keep], q_ids[:, 0], g_ids[keep, 0], q_ids[:, 1], g_ids[keep, 1])
    final = read(train_dir / "results.json")
    assert np.mean(all_ap) * 100 == pytest.approx(final["mAP"], abs=1e-3)
    assert cmc[0] * 100 == pytest.approx(final["Rank-1"], abs=1e-3)

    # The ranking: cosine distances of the saved features, closest first, top 5.
    normed = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = 1 - normed(query) @ normed(gallery).T
    lists = read(tmp_path / "ranking.json")
    assert [entry["query"] for entry in lists] == query_paths
    for q, entry in enumerate(lists):
        expected = np.argsort(cosine[q], kind="stable")[:5]
        assert [g["image"] for g in entry["top"]] == [gallery_paths[g] for g in expected]
        np.testing.assert_allclose([g["distance"] for g in entry["top"]], cosine[q, expected], atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_extract_features_alone_writes_one_row_per_image(trained, datasets_root, tmp_path):
    tool = load_extract_tool()
    folder = datasets_root / "SyntheticMarketTiny" / "query"
    _, gallery, dist = tool.main(["--config-file", PROMPTSG_CFG, "--images", str(folder), "--output", str(tmp_path),
                                  *TINY, "MODEL.WEIGHTS", str(trained["simplified"] / "model_final.pth")])
    assert dist is None and not (tmp_path / "ranking.json").exists()
    assert np.load(tmp_path / "features.npy").shape == gallery.shape == (len(list(folder.glob("*.jpg"))), 64)  # tiny-ViT width


def test_extract_features_bad_input_fails_in_one_line_before_the_model_is_built(trained, tmp_path):
    weights = str(trained["simplified"] / "model_final.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    tool = load_extract_tool()
    cases = [
        (["--images", str(tmp_path / "missing")], "--images: folder not found: "),
        (["--images", str(tmp_path / "empty")], "--images: no .jpg/.jpeg/.png/.bmp image under "),
        (["--images", str(tmp_path / "broken")], "corrupt or unreadable image: " + str(tmp_path / "broken" / "a.jpg")),
    ]
    for args, message in cases:
        with pytest.raises(tool.InputError, match="^" + re.escape(message)):
            tool.main(["--config-file", PROMPTSG_CFG, *args, "--output", str(tmp_path / "out"), *TINY,
                       "MODEL.WEIGHTS", weights])
    with pytest.raises(tool.InputError, match=r"SIE_CAMERA is on: give --camera.*0\.\.5 \(got None\)"):
        tool.main(["--config-file", PROMPTSG_CFG, "--images", str(tmp_path), "--output", str(tmp_path / "out"), *TINY,
                   "MODEL.CLIP.SIE_CAMERA", "True", "MODEL.CLIP.NUM_CAMERAS", "6", "MODEL.WEIGHTS", weights])
    assert not (tmp_path / "out").exists()                      # nothing written, nothing built
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--config-file",
                             PROMPTSG_CFG, "--images", str(tmp_path), "--output", str(tmp_path / "out")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_line_error(result, "MODEL.WEIGHTS is not set")


def test_extract_features_in_bf16_stays_close_to_float32(trained, datasets_root, tmp_path):
    """--bf16: the model under bf16 autocast (faster on GPUs; here CPU autocast), the distances in
    float32. Features and the Market mAP stay close to the float32 run's."""
    from fastreid.evaluation.rank import evaluate_rank

    tool = load_extract_tool()
    split = datasets_root / "SyntheticMarketTiny"
    folders = ["--config-file", PROMPTSG_CFG, "--query", str(split / "query"), "--images", str(split / "bounding_box_test")]
    opts = [*TINY, "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "MODEL.WEIGHTS", str(trained["composed"] / "model_final.pth")]
    runs = {}
    for precision in ("fp32", "bf16"):
        flags = ["--output", str(tmp_path / precision)] + (["--bf16"] if precision == "bf16" else [])
        runs[precision] = tool.main([*folders, *flags, *opts])
    (q32, g32, d32), (q16, g16, d16) = runs["fp32"], runs["bf16"]
    assert d16.dtype == np.float32 and g16.dtype == np.float32
    assert not np.array_equal(g16, g32)                          # it did run in bf16
    normed = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = np.sum(normed(np.vstack([q16, g16])) * normed(np.vstack([q32, g32])), axis=1)
    assert cosine.min() > 0.99, cosine.min()
    paths = (tmp_path / "fp32" / "images.txt").read_text().split()
    queries = (tmp_path / "fp32" / "query_images.txt").read_text().split()
    q_ids, g_ids = np.array([market_ids(p) for p in queries]), np.array([market_ids(p) for p in paths])
    keep = g_ids[:, 0] != -1
    maps = [np.mean(evaluate_rank(d[:, keep], q_ids[:, 0], g_ids[keep, 0], q_ids[:, 1], g_ids[keep, 1])[1]) * 100
            for d in (d32, d16)]
    print(f"mAP float32 {maps[0]:.2f}, bf16 {maps[1]:.2f}; min feature cosine {cosine.min():.4f}")
    assert abs(maps[0] - maps[1]) < 2.0, maps


def test_seed_reproduces_a_training_run(datasets_root, tmp_path):
    """SEED N (FastReID itself has no seed option): two runs with one seed give the same model and
    metrics, with data-loader worker processes; another seed gives another run."""
    results, weights = {}, {}
    for tag, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out_dir = tmp_path / tag
        result = run(["--config-file", PROMPTSG_CFG, *TINY, "DATALOADER.NUM_WORKERS", "2", "SEED", seed,
                      "OUTPUT_DIR", str(out_dir)], datasets_root)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"SEED {seed}: RNGs seeded with {seed}" in (out_dir / "log.txt").read_text()
        results[tag] = read(out_dir / "results.json")
        assert set(results[tag].pop("timing")) == {"train_seconds", "evaluation_seconds"}   # seconds: not seeded
        weights[tag] = torch.load(out_dir / "model_final.pth", weights_only=False)["model"]
    assert results["a"] == results["b"]
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert results["c"] != results["a"]
    assert not torch.equal(weights["c"]["heads.classifier.weight"], weights["a"]["heads.classifier.weight"])
