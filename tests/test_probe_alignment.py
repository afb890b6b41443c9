"""tools/probe_alignment.py: its fixed batch is the first identities' images under the test
transforms, and its figures are the SupCon terms and collapse monitors written out here by hand."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.data.build import build_transforms
from fastreid.data.data_utils import read_image
from fastreid.engine import DefaultTrainer
from fastreid.utils.checkpoint import Checkpointer
from promptsg import add_promptsg_config

from tiny_runs import BASELINE_CFG, PROMPTSG_CFG, TINY, load_tool, market_ids


def probe_tool():
    return load_tool("tools/probe_alignment.py")


def tiny_cfg(config=PROMPTSG_CFG, *opts):
    cfg = add_promptsg_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, *opts])
    return cfg


def tiny_model(config=PROMPTSG_CFG, seed=0):
    torch.manual_seed(seed)
    model = DefaultTrainer.build_model(tiny_cfg(config))
    for module in model.modules():          # running statistics, so that eval-mode BatchNorm acts
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def in_datasets(datasets_root, monkeypatch):
    monkeypatch.setenv("FASTREID_DATASETS", str(datasets_root))
    return datasets_root


def test_fixed_batch_is_the_lowest_identities_with_enough_images_under_the_test_transforms(in_datasets):
    cfg = tiny_cfg()
    images, targets = probe_tool().fixed_batch(cfg, 3, 2)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2]
    # Independently: the training folder's files by person id, read under the test transforms.
    files = glob.glob(os.path.join(str(in_datasets), "**", "bounding_box_train", "*.jpg"), recursive=True)
    by_pid = {}
    for path in files:
        by_pid.setdefault(market_ids(path)[0], []).append(path)
    lowest = sorted(pid for pid, paths in by_pid.items() if len(paths) >= 2)[:3]
    transform = build_transforms(cfg, is_train=False)
    for k, pid in enumerate(lowest):
        candidates = [transform(read_image(p)) for p in by_pid[pid]]
        chosen = images[2 * k:2 * k + 2]
        matches = [[j for j, c in enumerate(candidates) if torch.equal(c, image)] for image in chosen]
        assert all(len(m) == 1 for m in matches) and matches[0] != matches[1], pid


def hand_supcon(anchors, candidates, targets, temperature):
    """-mean_n sum_{p in P(n)} log softmax_i(cos(a_n, c_i) / tau)[p], by loops (Eq. 5-6, positives summed)."""
    n, total = len(targets), 0.0
    for i in range(n):
        sims = [F.cosine_similarity(anchors[i], candidates[j], dim=0).item() / temperature for j in range(n)]
        log_z = math.log(sum(math.exp(s) for s in sims))
        total += sum(sims[j] - log_z for j in range(n) if targets[j] == targets[i])
    return -total / n


def test_figures_against_a_hand_computation(in_datasets):
    model, tool = tiny_model(), probe_tool()
    images, targets = tool.fixed_batch(tiny_cfg(), 4, 2)
    out = tool.probe(model, images, targets)
    with torch.no_grad():
        v = model.image_embeddings({"images": images})
        l_p = model.text.compose(model.heads.inversion(v))
    tau = model.loss_kwargs["supcon"]["temperature"]
    assert (out["batch"], out["identities"]) == (8, 4)
    assert out["chance"] == pytest.approx(2 * math.log(8)) and out["floor"] == pytest.approx(2 * math.log(2))
    assert out["L_i2t"] == pytest.approx(hand_supcon(v, l_p, targets.tolist(), tau), rel=1e-4)
    assert out["L_t2i"] == pytest.approx(hand_supcon(l_p, v, targets.tolist(), tau), rel=1e-4)
    assert out["L_i2t"] != pytest.approx(out["L_t2i"], rel=1e-3)       # two directions, two values
    same = [F.cosine_similarity(l_p[i], l_p[j], dim=0).item()
            for i in range(8) for j in range(8) if i != j and targets[i] == targets[j]]
    other = [F.cosine_similarity(l_p[i], l_p[j], dim=0).item()
             for i in range(8) for j in range(8) if targets[i] != targets[j]]
    assert out["text_cos_same_id"] == pytest.approx(sum(same) / len(same), abs=1e-5)
    assert out["text_cos_other_id"] == pytest.approx(sum(other) / len(other), abs=1e-5)
    pairs = [F.cosine_similarity(v[i], v[j], dim=0).item() for i in range(8) for j in range(8) if i != j]
    assert out["collapse_v_cos"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    assert out["v_norm"] == pytest.approx(v.norm(dim=1).mean().item(), rel=1e-5)


def test_a_model_without_a_prompt_gets_the_visual_figures_only(in_datasets):
    tool = probe_tool()
    images, targets = tool.fixed_batch(tiny_cfg(BASELINE_CFG), 3, 2)
    out = tool.probe(tiny_model(BASELINE_CFG), images, targets)
    assert "collapse_v_cos" in out and "L_i2t" not in out and "text_cos_same_id" not in out


def test_main_probes_the_checkpoint_it_is_given(in_datasets, tmp_path, capsys):
    """MODEL.WEIGHTS is loaded: the figures are the saved model's, not a fresh build's."""
    saved = tiny_model(seed=3)
    Checkpointer(saved, str(tmp_path)).save("model")
    weights = str(tmp_path / "model.pth")
    tool = probe_tool()
    args = ["--config-file", PROMPTSG_CFG, "--ids", "4", "--per-id", "2", "--json", *TINY]
    loaded = tool.main([*args, "MODEL.WEIGHTS", weights])
    images, targets = tool.fixed_batch(tiny_cfg(), 4, 2)
    expected = tool.probe(saved, images, targets)
    for key in ("L_i2t", "v_norm", "pseudo_token_norm", "text_cos_same_id"):
        assert loaded[key] == pytest.approx(expected[key], rel=1e-5), key
    fresh = tool.main(args)              # the config's CLIP with new heads: other weights, other figures
    assert fresh["v_norm"] != pytest.approx(loaded["v_norm"], rel=1e-3)
    assert fresh["pseudo_token_norm"] != pytest.approx(loaded["pseudo_token_norm"], rel=1e-3)
    assert '"L_i2t"' in capsys.readouterr().out


def test_too_few_identities_is_one_line_naming_the_dataset(in_datasets):
    with pytest.raises(SystemExit) as exit_:
        probe_tool().main(["--config-file", PROMPTSG_CFG, "--ids", "500", *TINY])
    message = str(exit_.value.code)
    assert message.startswith("error: SyntheticMarketTiny: only ") and "have 4 images" in message
    assert "\n" not in message
