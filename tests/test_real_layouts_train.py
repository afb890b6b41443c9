"""Every dataset config trains through FastReID's own readers: one epoch of a tiny model on the
synthetic people written in each real layout (promptsg.data.synthetic.real_layouts), from every
``projects/PromptSG/configs/<dataset>/{vit,rn50}.yml`` and every FastReID baseline under
``configs/<dataset>/``, shrunk by overrides (a tiny CLIP, ResNet-18, a small ViT, 64x32 images),
evaluated with FastReID's evaluator, its results.json naming the variant read."""
import glob
import json
import os

import pytest

import promptsg  # noqa: F401
from fastreid.engine import default_argument_parser
from promptsg.data.synthetic.real_layouts import write_real_layout
from promptsg.engine.trainer import train_and_evaluate

from tiny_runs import ROOT

# dataset config folder -> (layout written, FastReID dataset name, the variant results.json names)
DATASETS = {"Market1501": ("Market1501", "Market1501", "Market-1501-v15.09.15"),
            "DukeMTMC": ("DukeMTMC", "DukeMTMC", "DukeMTMC-reID"),
            "MSMT17": ("MSMT17_V2", "MSMT17", "MSMT17, MSMT17_V2 (faces blurred)"),
            "CUHK03": ("CUHK03", "CUHK03", "CUHK03-NP, labeled boxes")}
SMALL = ["INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "SOLVER.IMS_PER_BATCH", "16",
         "SOLVER.MAX_EPOCH", "1", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "1",
         "TEST.IMS_PER_BATCH", "64", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False",
         "SEED", "0"]
TINY_VIT = ["MODEL.CLIP.NAME", "tiny-ViT", "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.STRIDE", "16",
            "MODEL.PROMPTSG.MIM.HEADS", "2"]
TINY_RN = ["MODEL.CLIP.NAME", "tiny-RN", "MODEL.CLIP.PRETRAINED", "", "MODEL.PROMPTSG.MIM.HEADS", "2"]
STAGE1 = ["SOLVER.STAGE1.MAX_EPOCH", "1", "SOLVER.STAGE1.IMS_PER_BATCH", "16"]     # CLIP-ReID's stage 1, shortened
SHRINK = {"vit.yml": TINY_VIT, "clip_baseline.yml": TINY_VIT, "rn50.yml": TINY_RN,
          "clipreid_vit.yml": TINY_VIT + STAGE1, "clipreid_vit_sie_olp.yml": TINY_VIT + STAGE1,
          "clipreid_rn50.yml": TINY_RN + STAGE1,
          "bagtricks_vit.yml": ["MODEL.BACKBONE.DEPTH", "small", "MODEL.BACKBONE.PRETRAIN", "False",
                                "SOLVER.FREEZE_ITERS", "0"],
          "R50": ["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512", "MODEL.BACKBONE.PRETRAIN", "False",
                  "SOLVER.FREEZE_ITERS", "0"]}


def configs():
    found = []
    for dataset in DATASETS:
        found += [os.path.relpath(p, ROOT) for p in
                  sorted(glob.glob(os.path.join(ROOT, "projects", "PromptSG", "configs", dataset, "*.yml")))
                  + sorted(glob.glob(os.path.join(ROOT, "configs", dataset, "*.yml")))]
    return found


def test_every_dataset_config_is_covered():
    """The configs are found in the repository: one added later joins the run test below."""
    found = configs()
    for dataset in DATASETS:
        assert {f"projects/PromptSG/configs/{dataset}/{n}" for n in ("vit.yml", "rn50.yml")} <= set(found)
        assert len([c for c in found if c.startswith(f"configs/{dataset}/")]) == 4
    assert all(os.path.basename(c) in SHRINK or c.endswith("_R50.yml") for c in found)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, datasets_root):
    source = str(datasets_root / "SyntheticMarketTiny")
    written = {}
    for dataset, (layout, _, _) in DATASETS.items():
        root = tmp_path_factory.mktemp(layout)
        write_real_layout(layout, source, str(root))
        written[dataset] = root
    return written


@pytest.mark.parametrize("config", configs())
def test_one_epoch_trains_and_evaluates_on_the_real_layout(config, roots, tmp_path, monkeypatch):
    import fastreid.data.build as data_build

    dataset = config.split(os.sep)[-2]
    layout, name, variant = DATASETS[dataset]
    monkeypatch.setattr(data_build, "_root", str(roots[dataset]))
    monkeypatch.setenv("FASTREID_DATASETS", str(roots[dataset]))
    shrink = SHRINK["R50" if config.endswith("_R50.yml") else os.path.basename(config)]
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, config), *SMALL, *shrink, "OUTPUT_DIR", str(tmp_path)])
    results = train_and_evaluate(args)
    assert 0 < results["mAP"] <= 100 and results["queries_evaluated"] > 0
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["datasets"] == {name: variant} or written["datasets"][name].startswith(variant)
    assert (tmp_path / "model_final.pth").exists()
