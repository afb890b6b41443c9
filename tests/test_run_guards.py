"""Nothing lost, nothing silently wrong, part two: one run per OUTPUT_DIR, duplicate config keys,
empty or unscorable test splits, numbers out of range, skipped queries, MODEL.WEIGHTS a folder.

Each test fails without its fix: FastReID writes any number of runs into one folder, YAML keeps the
last of two equal keys, FastReID's ranker asserts on an empty query set after the last epoch,
``SOLVER.MAX_EPOCH 0`` fails after "Starting training", and the ranker drops queries unannounced.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from promptsg.engine.output_dir import LOCK_NAME, OutputDirLock, check_new_run, remove_previous_run
from promptsg.engine.preflight import InputError, check_config, check_datasets, check_weights, load_config, valid_queries

from tiny_runs import BOT_CFG, PROMPTSG_CFG, ROOT, TINY, one_line_error, run


def promptsg_cfg(*opts):
    return load_config(promptsg.add_promptsg_config(get_cfg()), PROMPTSG_CFG, [*TINY, *opts])


# ---- 1. one run per OUTPUT_DIR ----

HOLDER = """
import sys, time
from promptsg.engine.output_dir import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(folder):
    """A process holding ``folder``'s lock, as a live run does; returns it once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_into_a_held_output_dir_stops_naming_the_folder_and_the_holder(tmp_path, datasets_root, caplog):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold(out)
    try:
        result = run(["--config-file", PROMPTSG_CFG, *TINY, "OUTPUT_DIR", str(out)], datasets_root)
        one_line_error(result, f"OUTPUT_DIR {out} is in use by another run", f"process {holder.pid} on")
        with pytest.raises(InputError, match=f"process {holder.pid}"):   # an evaluation into it too
            OutputDirLock(str(out)).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == [LOCK_NAME]                        # the refused run wrote nothing
    # Killed without releasing: its lock is stale, taken over with one line naming the run that left it.
    with caplog.at_level(logging.WARNING, logger="promptsg.engine.output_dir"):
        lock = OutputDirLock(str(out)).acquire()
    assert any("stale" in r.getMessage() and f"process {holder.pid}" in r.getMessage() for r in caplog.records)
    lock.release()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="promptsg.engine.output_dir"), OutputDirLock(str(out)):
        pass                                                             # released cleanly: nothing stale
    assert not caplog.records


def test_one_process_cannot_hold_a_folder_twice_and_a_release_frees_it(tmp_path):
    first = OutputDirLock(str(tmp_path)).acquire()
    with pytest.raises(InputError, match=f"process {os.getpid()}"):
        OutputDirLock(str(tmp_path)).acquire()
    first.release()
    OutputDirLock(str(tmp_path)).acquire().release()


def test_a_new_run_into_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, datasets_root):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_0001.pth", "model_final.pth", "last_checkpoint", "results.json", "log.txt", "metrics.json"):
        (out / name).write_text(name)
    (out / "notes.txt").write_text("mine")
    (out / "composed").mkdir()
    with pytest.raises(InputError, match=r"already holds a run \(last_checkpoint, model_0001.pth, model_final.pth "
                                         r"and 1 more\): continue it with --resume.*--overwrite"):
        check_new_run(str(out), resume=False, overwrite=False)
    assert check_new_run(str(out), resume=True, overwrite=False) == []
    with pytest.raises(InputError, match="choose one"):
        check_new_run(str(out), resume=True, overwrite=True)
    assert check_new_run(str(tmp_path / "empty"), resume=False, overwrite=False) == []
    # --overwrite with bad input elsewhere (a truncated gallery image): refused before anything is removed.
    root = tmp_path / "copy"
    shutil.copytree(datasets_root, root)
    victim = sorted((root / "SyntheticMarketTiny" / "bounding_box_test").glob("*.jpg"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])
    result = run(["--config-file", PROMPTSG_CFG, "--overwrite", *TINY, "OUTPUT_DIR", str(out)], root)
    one_line_error(result, str(victim))
    assert (out / "model_final.pth").read_text() == "model_final.pth"
    # Without --overwrite: one line, nothing touched.
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "OUTPUT_DIR", str(out)], datasets_root)
    one_line_error(result, f"OUTPUT_DIR {out} already holds a run", "--resume", "--overwrite")
    assert (out / "model_final.pth").read_text() == "model_final.pth"
    # --overwrite removes the names train_net writes, and nothing else.
    remove_previous_run(str(out), check_new_run(str(out), resume=False, overwrite=True))
    assert sorted(os.listdir(out)) == [LOCK_NAME, "composed", "notes.txt"]


def test_a_refused_start_leaves_the_lock_undescribed_and_glob_characters_are_literal(tmp_path, datasets_root, caplog):
    """A start refused after the lock was taken (the folder holds a run) releases it: the next run
    finds no holder to call stale. ``run[1]`` is a folder name, not a pattern matching ``run1``."""
    out = tmp_path / "run[1]"
    out.mkdir()
    (out / "model_final.pth").write_text("a finished run")
    (tmp_path / "run1").mkdir()
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "OUTPUT_DIR", str(out)], datasets_root)
    one_line_error(result, f"OUTPUT_DIR {out} already holds a run (model_final.pth)")
    assert (out / LOCK_NAME).read_text() == ""
    with caplog.at_level(logging.WARNING, logger="promptsg.engine.output_dir"), OutputDirLock(str(out)):
        pass
    assert not caplog.records
    assert (out / "model_final.pth").read_text() == "a finished run"
    assert check_new_run(str(tmp_path / "run1"), resume=False, overwrite=False) == []
    (tmp_path / "run1" / "model_final.pth").write_text("x")
    assert check_new_run(str(tmp_path / "run[1]"), resume=False, overwrite=True) == [str(out / "model_final.pth")]


def test_the_project_scripts_start_their_runs_so_that_a_second_start_works():
    """run_synthetic.py retrains the demo (--overwrite), run_ablations.py continues or reuses a row
    (--resume, promptsg.analysis.ablations.run_one), and make compare continues BoT's run
    (--resume): each call to train_net says so."""
    def calls(path):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        return text
    assert '"--overwrite", *common' in calls("tools/run_synthetic.py")
    assert '"--config-file", config, "--resume", *common' in calls(
        os.path.join("projects", "PromptSG", "promptsg", "analysis", "ablations.py"))
    assert "bagtricks_R18.yml --resume" in calls("Makefile")


# ---- 2. duplicate keys in a YAML config ----

def test_a_duplicate_key_or_section_is_refused_naming_file_key_and_lines(tmp_path):
    cfg = tmp_path / "dup.yml"
    cfg.write_text(f"_BASE_: {PROMPTSG_CFG}\nSOLVER:\n  MAX_EPOCH: 1\nMODEL:\n  DEVICE: cpu\nSOLVER:\n  MAX_EPOCH: 12\n")
    with pytest.raises(InputError, match=rf"{cfg}: duplicate key SOLVER \(lines 2 and 6\)"):
        load_config(promptsg.add_promptsg_config(get_cfg()), str(cfg), [])
    nested = tmp_path / "nested.yml"
    nested.write_text("MODEL:\n  PROMPTSG:\n    MIM:\n      FUSION: learned_map\n      FUSION: attention\n")
    with pytest.raises(InputError, match=r"duplicate key MODEL.PROMPTSG.MIM.FUSION \(lines 4 and 5\)"):
        load_config(promptsg.add_promptsg_config(get_cfg()), str(nested), [])
    child = tmp_path / "child.yml"                                       # in a _BASE_ file: that file is named
    child.write_text("_BASE_: nested.yml\nSEED: 1\n")
    with pytest.raises(InputError, match=rf"{nested}: duplicate key MODEL.PROMPTSG.MIM.FUSION"):
        load_config(promptsg.add_promptsg_config(get_cfg()), str(child), [])
    same_name = tmp_path / "ok.yml"                                      # one name in two sections is no duplicate
    same_name.write_text(f"_BASE_: {PROMPTSG_CFG}\nSOLVER:\n  MAX_EPOCH: 3\nTEST:\n  IMS_PER_BATCH: 8\n"
                         "DATALOADER:\n  NUM_WORKERS: 0\n")
    loaded = load_config(promptsg.add_promptsg_config(get_cfg()), str(same_name), [])
    assert loaded.SOLVER.MAX_EPOCH == 3


def test_every_project_config_is_free_of_duplicate_keys():
    from promptsg.engine.preflight import check_duplicate_keys

    configs = [os.path.join(d, f) for top in ("configs", "projects/PromptSG/configs")
               for d, _, files in os.walk(os.path.join(ROOT, top)) for f in files if f.endswith(".yml")]
    assert len(configs) > 20
    for path in configs:
        check_duplicate_keys(path)


# ---- 4. empty or unscorable test splits, found at start-up ----

def market_copy(tmp_path, datasets_root):
    """The tiny split in Market-1501's own folder, read by FastReID's Market1501 class."""
    root = tmp_path / "root"
    shutil.copytree(os.path.join(datasets_root, "SyntheticMarketTiny"), root / "Market-1501-v15.09.15",
                    ignore=shutil.ignore_patterns("manifest.json"))
    return root


MARKET = ["DATASETS.NAMES", '("Market1501",)', "DATASETS.TESTS", '("Market1501",)']


@pytest.mark.parametrize("split", ["query", "bounding_box_test"])
def test_an_empty_query_or_gallery_folder_is_named_at_start_up(tmp_path, datasets_root, split):
    root = market_copy(tmp_path, datasets_root)
    folder = root / "Market-1501-v15.09.15" / split
    for f in folder.iterdir():
        f.unlink()
    cfg = promptsg_cfg(*MARKET)
    with pytest.raises(InputError, match=f"dataset Market1501: no {'query' if split == 'query' else 'gallery'} "
                                         f"images in {folder}"):
        check_datasets(cfg, str(root), verify_images=False)
    if split == "query":   # and through train_net, training or --eval-only: one line, before anything runs
        one_line_error(run(["--config-file", PROMPTSG_CFG, *TINY, *MARKET, "OUTPUT_DIR", str(tmp_path / "o")], root),
                       str(folder))


def test_a_split_where_no_query_has_a_valid_match_is_refused_at_start_up(tmp_path, datasets_root):
    root = market_copy(tmp_path, datasets_root)
    market = root / "Market-1501-v15.09.15"
    query_pids = {f.name[:4] for f in (market / "query").iterdir()}
    for f in (market / "bounding_box_test").iterdir():                 # the query identities' gallery images go
        if f.name[:4] in query_pids:
            f.unlink()
    with pytest.raises(InputError, match=r"none of the \d+ queries .* has a gallery image of its identity from "
                                         r"another camera"):
        check_datasets(promptsg_cfg(*MARKET), str(root), verify_images=False)


def test_valid_queries_follow_the_market_protocol_by_hand():
    gallery = [("g", 1, 0), ("g", 1, 1), ("g", 2, 0), ("g", 0, 2)]
    query = [("q", 1, 0),    # gallery camera 1: valid
             ("q", 2, 0),    # only the same camera: skipped
             ("q", 3, 1),    # identity not in the gallery: skipped
             ("q", 2, 1)]    # camera 0 in the gallery: valid
    assert valid_queries(query, gallery) == 2


# ---- 5. numbers out of range, at start-up ----

# A ResNet has no CLS attention or transformer blocks for the default map (Base-PromptSG.yml's keys
# and prior): the rn50 configs turn both off, as here.
RN_MAP = ["MODEL.PROMPTSG.MIM.MAP_KEYS", "", "MODEL.PROMPTSG.MIM.MAP_PRIOR", ""]


@pytest.mark.parametrize("opts,fragment", [
    (["SOLVER.MAX_EPOCH", "0"], "SOLVER.MAX_EPOCH must be >= 1, got 0"),
    (["SOLVER.MAX_EPOCH", "-1"], "SOLVER.MAX_EPOCH must be >= 1, got -1"),
    (["SOLVER.BASE_LR", "0.0"], "SOLVER.BASE_LR must be > 0, got 0.0"),
    (["SOLVER.BASE_LR", "-0.001"], "SOLVER.BASE_LR must be > 0"),
    (["SOLVER.IMS_PER_BATCH", "18"], "SOLVER.IMS_PER_BATCH 18 must be divisible by DATALOADER.NUM_INSTANCE 4"),
    (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be >= 1"),
    (["TEST.EVAL_PERIOD", "0"], "TEST.EVAL_PERIOD must be >= 1"),
    (["TEST.IMS_PER_BATCH", "0"], "TEST.IMS_PER_BATCH must be >= 1"),
    (["TEST.QUERY_CHUNK", "-1"], "TEST.QUERY_CHUNK must be >= 0 (0: FastReID's dense evaluation), got -1"),
    (["TEST.RERANK.ENABLED", "True", "TEST.RERANK.K1", "5", "TEST.RERANK.K2", "6"],
     "TEST.RERANK needs 1 <= K2 <= K1, got K1 5 and K2 6"),
    (["TEST.RERANK.ENABLED", "True", "TEST.RERANK.LAMBDA", "1.5"], "TEST.RERANK.LAMBDA must be in [0, 1], got 1.5"),
    (["INPUT.SIZE_TRAIN", "[8, 8]", "INPUT.SIZE_TEST", "[8, 8]"], "smaller than the 16-pixel patches of tiny-ViT"),
    (["MODEL.CLIP.STRIDE", "0"], "MODEL.CLIP.STRIDE must be in [1, 16]"),
    ([*RN_MAP, "MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 40]", "INPUT.SIZE_TEST", "[64, 40]"],
     "INPUT.SIZE_TRAIN [64, 40] must be divisible by 16, the output stride of tiny-RN at MODEL.BACKBONE.LAST_STRIDE 1"),
    ([*RN_MAP, "MODEL.CLIP.NAME", "tiny-RN", "MODEL.BACKBONE.LAST_STRIDE", "2", "INPUT.SIZE_TRAIN", "[64, 48]",
      "INPUT.SIZE_TEST", "[64, 48]"], "must be divisible by 32"),
    ([*RN_MAP, "MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
      "MODEL.CLIP.SIE_CAMERA", "True", "MODEL.CLIP.NUM_CAMERAS", "6"],
     "MODEL.CLIP.SIE_CAMERA needs a ViT visual tower; tiny-RN is a ModifiedResNet"),
    (["MODEL.CLIP.NAME", "tiny-nothing"], "MODEL.CLIP.NAME='tiny-nothing' is not an open_clip model config"),
    (["MODEL.PROMPTSG.MIM.HEADS", "7"], "MODEL.PROMPTSG.MIM.HEADS must divide tiny-ViT's embedding width 64, got 7"),
    (["MODEL.PROMPTSG.MIM.HEADS", "0"], "MODEL.PROMPTSG.MIM.HEADS must divide tiny-ViT's embedding width 64, got 0"),
    (["MODEL.PROMPTSG.MIM.MAP_PRIOR", "rollout"], "MODEL.PROMPTSG.MIM.MAP_PRIOR must be '' or 'cls_attention', got 'rollout'"),
    (["MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
      "MODEL.PROMPTSG.MIM.MAP_PRIOR", "cls_attention"],
     "MODEL.PROMPTSG.MIM.MAP_PRIOR cls_attention needs a ViT encoder's CLS attention; MODEL.CLIP.NAME tiny-RN "
     "is a ModifiedResNet"),
    (["MODEL.PROMPTSG.MIM.MAP_PRIOR", "cls_attention", "MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER", "0.0"],
     "MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER must be a positive number, got 0.0"),
    (["MODEL.PROMPTSG.MIM.MAP_KEYS", "first"], "MODEL.PROMPTSG.MIM.MAP_KEYS must be '' or 'penultimate', got 'first'"),
    (["MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
      "MODEL.PROMPTSG.MIM.MAP_KEYS", "penultimate", "MODEL.PROMPTSG.MIM.MAP_PRIOR", ""],
     "MODEL.PROMPTSG.MIM.MAP_KEYS penultimate needs a ViT encoder's blocks; MODEL.CLIP.NAME tiny-RN is a ModifiedResNet"),
])
def test_out_of_range_numbers_fail_naming_the_key(opts, fragment):
    with pytest.raises(InputError, match=None) as info:
        check_config(promptsg_cfg(*opts))
    assert fragment in str(info.value)


def test_the_batch_must_split_evenly_over_the_processes_and_the_defaults_pass():
    check_config(promptsg_cfg(), processes=2)
    check_config(promptsg_cfg(*RN_MAP, "MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 32]",
                              "INPUT.SIZE_TEST", "[64, 32]"))
    with pytest.raises(InputError, match="SOLVER.IMS_PER_BATCH 16 must be divisible by the number of processes 3"):
        check_config(promptsg_cfg(), processes=3)
    bot = load_config(promptsg.add_promptsg_config(get_cfg()), BOT_CFG, ["SOLVER.MAX_EPOCH", "0"])
    with pytest.raises(InputError, match="SOLVER.MAX_EPOCH"):          # FastReID's own baselines too
        check_config(bot)


def test_zero_epochs_stop_before_training_in_one_line(tmp_path, datasets_root):
    one_line_error(run(["--config-file", PROMPTSG_CFG, *TINY, "SOLVER.MAX_EPOCH", "0",
                        "OUTPUT_DIR", str(tmp_path / "o")], datasets_root), "SOLVER.MAX_EPOCH must be >= 1, got 0")


# ---- 6. queries the protocol skips are counted ----

def test_skipped_queries_are_counted_in_the_results_and_the_log(caplog):
    from promptsg.engine.evaluation import ChunkedReidEvaluator as ReidEvaluator

    cfg = get_cfg()
    cfg.TEST.METRIC = "euclidean"
    evaluator = ReidEvaluator(cfg, num_query=3)
    # queries: pid 1 cam 0 (its match in cam 1), pid 2 cam 0 (gallery only in cam 0: skipped), pid 3 cam 1
    # and 8 far-away distractors (FastReID reads CMC up to rank 10)
    feats = torch.tensor([[0.0], [5.0], [9.0],                                   # queries
                          [0.1], [5.1], [8.0], *([20.0 + i] for i in range(8))])  # gallery
    pids = torch.tensor([1, 2, 3, 1, 2, 3] + [9] * 8)
    camids = torch.tensor([0, 0, 1, 1, 0, 0] + [0] * 8)
    evaluator.process({"targets": pids, "camids": camids}, feats)
    with caplog.at_level(logging.INFO, logger="promptsg.engine.evaluation"):
        results = evaluator.evaluate()
    assert results["queries_evaluated"] == 2 and results["queries_skipped"] == 1
    # by hand: query 1 ranks its match first (AP 1); query 3 (at 9.0) ranks pid 3 (8.0) first (AP 1)
    assert results["mAP"] == pytest.approx(100.0)
    assert any("evaluated 2 of 3 queries; 1 skipped" in r.getMessage() for r in caplog.records)


def test_an_unranked_block_counts_no_queries_and_warns_of_none(caplog):
    """``ranked_distances(rank=False)`` (features of unlabelled images, each labelled by its position):
    no query can match, but none was meant to be scored, so no "evaluated 0 of N" warning; after the
    block an evaluation counts and warns again."""
    from promptsg.engine.evaluation import ChunkedReidEvaluator as ReidEvaluator, ranked_distances

    def evaluate(pids):          # 2 queries in camera 0, then 11 gallery images (FastReID reads CMC to 10)
        evaluator = ReidEvaluator(get_cfg(), num_query=2)
        evaluator.process({"targets": torch.tensor(pids), "camids": torch.tensor([0, 0, 1] + [0] * 10)},
                          torch.randn(13, 4))
        return evaluator.evaluate()

    with caplog.at_level(logging.INFO, logger="promptsg.engine.evaluation"):
        with ranked_distances(rank=False) as ranked:
            results = evaluate(list(range(13)))                 # positions as labels: nothing can match
        assert ranked["dist"].shape == (2, 11) and "queries_evaluated" not in results
        assert not [r for r in caplog.records if "queries" in r.getMessage()]
        results = evaluate([0, 1, 0] + list(range(2, 12)))      # query 0 matches in camera 1, query 1 nowhere
    assert results["queries_evaluated"] == 1 and results["queries_skipped"] == 1
    assert any("evaluated 1 of 2 queries; 1 skipped" in r.getMessage() for r in caplog.records)


def test_results_json_holds_the_query_counts(tmp_path, datasets_root):
    out = tmp_path / "o"
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
                  "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)], datasets_root)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    from promptsg.data import SyntheticMarketTiny

    query = SyntheticMarketTiny(root=str(datasets_root)).query
    assert results["queries_evaluated"] + results["queries_skipped"] == len(query)
    assert results["queries_skipped"] == 0                               # the generator gives every query a match


# ---- 7. MODEL.WEIGHTS naming a folder ----

def test_model_weights_naming_a_folder_says_so_and_lists_its_checkpoints(tmp_path):
    cfg = promptsg_cfg("MODEL.WEIGHTS", str(tmp_path))
    with pytest.raises(InputError, match=f"MODEL.WEIGHTS {tmp_path} is a folder.*holds no .pth"):
        check_weights(cfg, eval_only=True)
    for name in ("model_final.pth", "model_0001.pth", "log.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(InputError, match=r"is a folder, not a checkpoint file: give one of its checkpoints "
                                         r"\(model_0001.pth, model_final.pth\)"):
        check_weights(cfg, eval_only=True)


# ---- 8. CLIP weights that do not say their activation ----

def test_clip_weights_without_their_activation_fail_at_start_up_naming_both_keys(tmp_path):
    """A plain state dict under a name without "-quickgelu": QuickGELU or GELU is asked for at the
    config check, before any model is built; a named activation, or a TorchScript archive, passes."""
    import open_clip

    plain = tmp_path / "clip_state_dict.pt"
    torch.save(open_clip.create_model("tiny-ViT").state_dict(), plain)
    cfg = promptsg_cfg("MODEL.CLIP.PRETRAINED", str(plain), "MODEL.CLIP.ACTIVATION", "")
    with pytest.raises(InputError) as error:
        check_weights(cfg, eval_only=False)
    message = str(error.value)
    assert message.startswith(f"MODEL.CLIP.PRETRAINED={plain} is a state dict that does not say")
    assert "set MODEL.CLIP.ACTIVATION quick_gelu" in message and "\n" not in message
    check_weights(promptsg_cfg("MODEL.CLIP.PRETRAINED", str(plain), "MODEL.CLIP.ACTIVATION", "gelu"), eval_only=False)
    archive = tmp_path / "openai_archive.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)        # a TorchScript archive's layout
    check_weights(promptsg_cfg("MODEL.CLIP.PRETRAINED", str(archive), "MODEL.CLIP.ACTIVATION", ""), eval_only=False)


def test_the_maps_options_are_the_map_fusions_and_a_resnet_needs_them_off():
    """MIM.MAP_KEYS, MAP_PRIOR and MAP_PRIOR_POWER shape learned_map's map: the "attention" fusion has
    none and builds without them; the default map on a ResNet is refused naming the prior; the power
    is read only with a prior."""
    from promptsg.modeling.heads import PromptSGHead
    attention = promptsg_cfg("MODEL.PROMPTSG.MIM.FUSION", "attention")
    check_config(attention)
    head = PromptSGHead.from_config(attention, embed_dim=64, token_dim=64)
    assert (head["mim_map_prior"], head["mim_penultimate_keys"], head["mim_prior_power"]) == (False, False, 1.0)
    default = PromptSGHead.from_config(promptsg_cfg(), embed_dim=64, token_dim=64)
    assert (default["mim_map_prior"], default["mim_penultimate_keys"], default["mim_prior_power"]) == (True, True, 2.0)
    no_prior = PromptSGHead.from_config(promptsg_cfg("MODEL.PROMPTSG.MIM.MAP_PRIOR", ""), embed_dim=64, token_dim=64)
    assert no_prior["mim_prior_power"] == 1.0
    with pytest.raises(InputError, match="MAP_PRIOR cls_attention needs a ViT encoder's CLS attention; "
                                         "MODEL.CLIP.NAME tiny-RN"):
        check_config(promptsg_cfg("MODEL.CLIP.NAME", "tiny-RN", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST",
                                  "[64, 32]"))
