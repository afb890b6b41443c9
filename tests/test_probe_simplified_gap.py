"""tools/probe_simplified_gap.py (promptsg.analysis.simplified_gap): the fixed MIM queries it swaps in
give the model's own features for the prompts they stand for, and its simplified and composed rows
are what FastReID's evaluation of the same checkpoint reports."""
import json
import os
import subprocess
import sys

import pytest
import torch

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer
from promptsg import add_promptsg_config
from promptsg.analysis import simplified_gap as probe
from promptsg.engine.preflight import InputError

from tiny_runs import BASELINE_CFG, PROMPTSG_CFG, ROOT, TINY, TRAIN_NET, load_tool


def probe_tool():
    return load_tool("tools/probe_simplified_gap.py")


def tiny_model(*opts):
    cfg = add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list([*TINY, *opts])
    torch.manual_seed(0)
    model = DefaultTrainer.build_model(cfg)
    # Random BatchNorm statistics, so that f_theta's and the BNNeck's eval-mode outputs are not the identity.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batch(n=5):
    generator = torch.Generator().manual_seed(1)
    return {"images": torch.rand(n, 3, 64, 32, generator=generator) * 255}


@torch.no_grad()
def test_fixed_simplified_query_is_the_simplified_prompts_feature():
    model, images = tiny_model(), batch()
    model.inference_prompt = "simplified"
    expected = model(images)
    l_simple = model.text.simple(1, model.device)[0]
    assert torch.allclose(probe.FixedQuery(model, l_simple)(images), expected, rtol=0, atol=1e-6)
    other = probe.FixedQuery(model, l_simple + torch.randn_like(l_simple))(images)
    assert (other - expected).abs().max() > 1e-2             # the query the probe swaps in is used


@torch.no_grad()
def test_each_images_own_prompt_as_fixed_query_is_its_composed_feature():
    model, images = tiny_model(), batch()
    model.inference_prompt = "composed"
    expected = model(images)
    prompts = probe.ComposedPrompts(model)(images)
    s = model.heads.inversion(model.image_embeddings(images))
    assert torch.allclose(prompts, model.text.compose(s), rtol=0, atol=1e-6)
    assert prompts.shape == (5, model.text.simple(1, model.device).shape[1])
    for i in range(5):
        one = {"images": images["images"][i:i + 1]}
        assert torch.allclose(probe.FixedQuery(model, prompts[i])(one), expected[i:i + 1], rtol=0, atol=1e-5)


def test_mean_cosine_against_a_hand_computation():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    prompts = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # query 0: cos 1 and 1/sqrt(2); query 1: cos 0 and 1/sqrt(2)
    expected = [(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2]
    assert probe.mean_cosine(queries, prompts).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_run(datasets_root, tmp_path_factory):
    """A one-epoch tiny PromptSG run (its results.json: the simplified prompt) and --eval-only of its
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


def test_probe_rows_match_fastreids_evaluation_of_the_checkpoint(tiny_run, datasets_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREID_DATASETS", str(datasets_root))
    results = probe_tool().main([str(tiny_run / "run"), str(tiny_run / "run"), "--alphas", "0.5",
                                 "--training-prompts", "2", "--output", str(tmp_path)])
    assert len(results["runs"]) == 2
    rows = {r["query"]: r for r in results["runs"][0]["rows"]}
    assert list(rows) == ["simplified", "between, a = 0.5", "mean training prompt",
                          "one training image's composed prompt (mean of 2 images)",
                          "own composed prompt (s* per image)", "another identity's composed prompt (per image)",
                          "reference: the composed prompt l_p alone as the feature, no MIM"]
    simplified = json.loads((tiny_run / "run" / "results.json").read_text())
    composed = json.loads((tiny_run / "composed" / "eval_results.json").read_text())
    assert rows["simplified"]["mAP"] == pytest.approx(simplified["mAP"], abs=1e-4)
    assert rows["simplified"]["Rank-1"] == pytest.approx(simplified["Rank-1"], abs=1e-4)
    assert rows["own composed prompt (s* per image)"]["mAP"] == pytest.approx(composed["mAP"], abs=1e-4)
    # The fixed queries' cosines to the training prompts: the mean prompt is nearer than the simplified one.
    assert rows["mean training prompt"]["cos_to_training_prompts"] > rows["simplified"]["cos_to_training_prompts"]
    # The same run twice: the summary is its rows with no spread.
    for summary, row in zip(results["summary"], results["runs"][0]["rows"]):
        assert summary["query"] == row["query"] and summary["mAP"] == pytest.approx(row["mAP"], abs=1e-9)
        assert summary["mAP_std"] == pytest.approx(0.0, abs=1e-9)
    written = json.loads(next(tmp_path.glob("syntheticmarkettiny_simplified_gap_*.json")).read_text())
    assert written["summary"] == results["summary"]
    assert written["runs"][1]["dataset"]["train_images"] > 0 and written["runs"][1]["dataset"]["query_images"] > 0


def test_summary_is_the_mean_and_sample_deviation_over_runs():
    runs = [{"rows": [{"query": "q", "mAP": m, "Rank-1": r, "cos_to_training_prompts": c}]}
            for m, r, c in ((40.0, 50.0, 0.1), (44.0, 56.0, 0.3), (48.0, 53.0, 0.2))]
    (row,) = probe.summarise(runs)
    assert (row["mAP"], row["Rank-1"], row["cos_to_training_prompts"]) == pytest.approx((44.0, 53.0, 0.2))
    assert (row["mAP_std"], row["Rank-1_std"]) == pytest.approx((4.0, 3.0))       # sample sd (n - 1)


def test_a_run_without_a_mim_is_one_line(tmp_path):
    cfg = add_promptsg_config(get_cfg())
    cfg.merge_from_file(BASELINE_CFG)
    cfg.merge_from_list(TINY)
    run = tmp_path / "baseline"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.dump())
    torch.save({"model": DefaultTrainer.build_model(cfg).state_dict()}, run / "model_final.pth")
    with pytest.raises(InputError, match="not a PromptSG run with composed prompts and a MIM"):
        probe.run_config(str(run))
    with pytest.raises(InputError, match="no config.yaml"):
        probe.run_config(str(tmp_path))


def test_other_identity_gives_every_image_another_persons_prompt():
    pids = [1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    for seed in range(20):
        perm = probe.other_identity(pids, seed)
        assert sorted(perm.tolist()) == list(range(len(pids)))          # a permutation
        assert all(pids[j] != pids[i] for i, j in enumerate(perm))      # nobody keeps their own identity
    with pytest.raises(ValueError):
        probe.other_identity([7, 7, 7])


@torch.no_grad()
def test_given_queries_follow_each_images_position():
    model, images = tiny_model(), batch(4)
    queries = torch.randn(6, model.text.simple(1, model.device).shape[1], generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([5, 0, 3, 3])
    out = probe.GivenQueries(model, queries)({**images, "targets": positions})
    for i, p in enumerate(positions.tolist()):
        one = {"images": images["images"][i:i + 1]}
        assert torch.allclose(out[i:i + 1], probe.FixedQuery(model, queries[p])(one), rtol=0, atol=1e-5)


def test_cosine_distance_against_a_hand_computation():
    from promptsg.analysis.text_search import cosine_distances

    d = cosine_distances([[1.0, 0.0], [1.0, 1.0]], [[0.0, 5.0], [2.0, 0.0]])
    assert d.ravel().tolist() == pytest.approx([1.0, 0.0, 1 - 2 ** -0.5, 1 - 2 ** -0.5], abs=1e-6)


def test_records_are_named_by_the_checkouts_commit_and_written_whole(tmp_path):
    from promptsg.utils.records import commit, write_record

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert commit(os.path.join(ROOT, "tools")) == head
    assert commit(str(tmp_path)) == "unknown"                       # not a git checkout
    paths = write_record(str(tmp_path / "out" / "table_2026-01-01_abc"), {"mAP": 1.5}, "| a |")
    assert [os.path.basename(p) for p in paths] == ["table_2026-01-01_abc.json", "table_2026-01-01_abc.md"]
    assert json.loads(open(paths[0]).read()) == {"mAP": 1.5} and open(paths[1]).read() == "| a |\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["table_2026-01-01_abc.json", "table_2026-01-01_abc.md"]


def test_a_commit_with_uncommitted_changes_says_so_when_asked(tmp_path):
    from promptsg.utils.records import commit

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("not a change of the commit's files")
    assert commit(str(tmp_path), "+changes") == head
    (tmp_path / "a.txt").write_text("b")
    assert commit(str(tmp_path), "+changes") == head + "+changes"
    assert commit(str(tmp_path)) == head
