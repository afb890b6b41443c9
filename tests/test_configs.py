"""Every shipped config merges; every PromptSG and CLIP-ReID config (ablations included) trains a step and
evaluates on CPU with a tiny CLIP on the synthetic dataset, with every trainable parameter
receiving a gradient (FastReID builds DistributedDataParallel without find_unused_parameters)."""
import glob
import os

import numpy as np
import pytest
import torch

import promptsg
from fastreid.config import get_cfg
from fastreid.data import build_reid_test_loader, build_reid_train_loader, samplers
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.evaluation import ReidEvaluator, inference_on_dataset
from fastreid.modeling import build_model
from fastreid.utils.events import EventStorage
from promptsg.engine.trainer import Trainer
from promptsg.data import SyntheticMarket
from promptsg.engine.evaluation import ranked_distances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTSG_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "projects/PromptSG/configs/**/*.yml"), recursive=True)
    if not os.path.basename(p).startswith("Base-"))
BASELINE_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs/**/*.yml"), recursive=True)
    if not os.path.basename(p).startswith("Base-"))


def _id(path):
    return os.path.relpath(path, ROOT)


def load(path):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg


def test_there_is_a_config_per_dataset_backbone_and_ablation():
    names = {_id(p) for p in PROMPTSG_CONFIGS}
    for ds in ("Market1501", "MSMT17", "DukeMTMC", "CUHK03"):
        assert f"projects/PromptSG/configs/{ds}/vit.yml" in names
        assert f"projects/PromptSG/configs/{ds}/rn50.yml" in names
        paper_recipe = load(os.path.join(ROOT, f"projects/PromptSG/configs/{ds}/ablations/paper_recipe.yml"))
        assert paper_recipe.MODEL.PROMPTSG.MIM.FUSION == "attention"                  # Eq. 7 as written
        assert paper_recipe.MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE == 0.0
        assert load(os.path.join(ROOT, f"projects/PromptSG/configs/{ds}/vit.yml")).MODEL.PROMPTSG.MIM.FUSION == "learned_map"
        map_pool = load(os.path.join(ROOT, f"projects/PromptSG/configs/{ds}/ablations/map_pool.yml")).MODEL
        assert (map_pool.PROMPTSG.MIM.FUSION, map_pool.LOSSES.SUPCON.MAP_SCALE) == ("learned_map", 0.5)
        for baseline in ("bagtricks_R50", "AGW_R50", "sbs_R50", "bagtricks_vit"):
            assert os.path.isfile(os.path.join(ROOT, "configs", ds, baseline + ".yml"))
    for ds in ("Market1501", "MSMT17"):
        for row in ("table3_b_no_i2t", "table3_c_no_t2i", "table3_d_no_mim", "table4_wo_composed",
                    "table5_1cross", "table5_1cross_1self", "table5_composed_test"):
            assert f"projects/PromptSG/configs/{ds}/ablations/{row}.yml" in names


# Training images // 64 per epoch: CLIP-ReID's 10 warm-up epochs in FastReID's iterations.
ITERATIONS_PER_EPOCH = {"Market1501": 12936 // 64, "MSMT17": 32621 // 64, "DukeMTMC": 16522 // 64, "CUHK03": 7368 // 64}


def test_clip_reid_configs_hold_the_published_recipe():
    """The values issue 31 lists from CLIP-ReID's vit_clipreid.yml and cnn_clipreid.yml."""
    for ds, iterations in ITERATIONS_PER_EPOCH.items():
        vit, olp, rn = (load(os.path.join(ROOT, f"projects/PromptSG/configs/{ds}/clipreid_{k}.yml"))
                        for k in ("vit", "vit_sie_olp", "rn50"))
        for cfg in (vit, olp, rn):
            assert cfg.MODEL.META_ARCHITECTURE == "CLIPReID" and cfg.DATASETS.NAMES == (ds,)
            s1 = cfg.SOLVER.STAGE1
            assert (s1.IMS_PER_BATCH, s1.BASE_LR, s1.WARMUP_EPOCHS, s1.WARMUP_LR, s1.MIN_LR, s1.WEIGHT_DECAY) == (
                64, 3.5e-4, 5, 1e-5, 1e-6, 1e-4)
            assert (cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.OPT) == (64, 4, "Adam")
            assert (cfg.MODEL.LOSSES.TRI.SCALE, cfg.MODEL.LOSSES.TRI.MARGIN, cfg.MODEL.LOSSES.I2T.SCALE) == (1.0, 0.3, 1.0)
            assert cfg.SOLVER.WARMUP_ITERS == 10 * iterations and cfg.MODEL.HEADS.NECK_FEAT == "before"
        for cfg in (vit, olp):
            assert (cfg.SOLVER.STAGE1.MAX_EPOCH, cfg.SOLVER.MAX_EPOCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_FACTOR,
                    list(cfg.SOLVER.STEPS), cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY,
                    cfg.MODEL.LOSSES.CE.SCALE) == (120, 60, 5e-6, 0.1, [30, 50], 2.0, 1e-4, 0.25)
        assert (vit.MODEL.CLIP.STRIDE, vit.MODEL.CLIP.SIE_CAMERA) == (16, False)
        assert (olp.MODEL.CLIP.STRIDE, olp.MODEL.CLIP.SIE_CAMERA, olp.MODEL.CLIP.SIE_COE) == (12, True, 1.0)
        assert (rn.MODEL.CLIP.NAME, rn.SOLVER.STAGE1.MAX_EPOCH, rn.SOLVER.MAX_EPOCH, rn.SOLVER.BASE_LR,
                rn.SOLVER.WARMUP_FACTOR, rn.SOLVER.WEIGHT_DECAY, list(rn.SOLVER.STEPS), rn.MODEL.LOSSES.CE.SCALE) == (
            "RN50", 60, 120, 3.5e-4, 0.01, 5e-4, [40, 70], 1.0)


@pytest.mark.parametrize("path", BASELINE_CONFIGS, ids=_id)
def test_fastreid_baseline_configs_merge(path):
    from fastreid.data.datasets import DATASET_REGISTRY

    cfg = load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "Baseline"
    dataset = cfg.DATASETS.NAMES[0]
    assert dataset in DATASET_REGISTRY._obj_map
    assert os.path.basename(os.path.dirname(path)) in (dataset, "Synthetic")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    data = SyntheticMarket(root=root, num_train_ids=8, num_test_ids=6, num_distractors=10, num_junk=0)
    return data


def tiny_overrides(cfg, num_classes):
    """Shrink a real config to a tiny CLIP of the same kind at 64x32 on CPU."""
    cfg.MODEL.CLIP.NAME = "tiny-RN" if "RN" in cfg.MODEL.CLIP.NAME else "tiny-ViT"
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.CLIP.STRIDE = 16
    cfg.MODEL.PROMPTSG.MIM.HEADS = 2
    cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.AMP.ENABLED = False
    cfg.TEST.IMS_PER_BATCH = 32
    return cfg


@pytest.mark.parametrize("path", PROMPTSG_CONFIGS, ids=_id)
def test_promptsg_config_trains_a_step_and_evaluates(path, tiny_data):
    cfg = load(path)
    assert cfg.MODEL.META_ARCHITECTURE in ("PromptSG", "CLIPReID")
    train_set = CommDataset(tiny_data.train, build_transforms(cfg, is_train=True), relabel=True)
    cfg = tiny_overrides(cfg, train_set.num_classes)
    if cfg.MODEL.CLIP.SIE_CAMERA:          # the tiny split's cameras, not the real dataset's
        cfg.MODEL.CLIP.NUM_CAMERAS = len({c for _, _, c in tiny_data.train + tiny_data.query + tiny_data.gallery})
    train_set.transform = build_transforms(cfg, is_train=True)
    sampler = samplers.NaiveIdentitySampler(train_set.img_items, 16, cfg.DATALOADER.NUM_INSTANCE)
    loader = build_reid_train_loader(train_set=train_set, sampler=sampler, total_batch_size=16, num_workers=0)

    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    with EventStorage(0):
        losses = model(next(iter(loader)))
    optimizer.zero_grad()
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient (DDP would fail): {no_grad[:5]}"
    optimizer.step()
    assert all(torch.isfinite(v) for v in losses.values())
    if "SupConLoss" in cfg.MODEL.LOSSES.NAME:
        assert "loss_supcon" in losses

    test_set = CommDataset(tiny_data.query + tiny_data.gallery, build_transforms(cfg, is_train=False), relabel=False)
    test_loader, num_query = build_reid_test_loader(
        test_set=test_set, test_batch_size=32, num_query=len(tiny_data.query), num_workers=0)
    with ranked_distances() as ranked:
        results = inference_on_dataset(model, test_loader, ReidEvaluator(cfg, num_query))
    # The evaluation ranks the cosine distances of the model's own test features ...
    feats = model_features(model.eval(), test_loader)
    expected_dist = 1 - feats[:num_query] @ feats[num_query:].t()
    np.testing.assert_allclose(ranked["dist"], expected_dist.numpy(), atol=1e-5)
    # ... and scores them as scikit-learn does, with the Market protocol.
    expected_map, expected_rank1 = market_metrics_by_sklearn(ranked)
    assert results["mAP"] == pytest.approx(expected_map, abs=1e-3)
    assert results["Rank-1"] == pytest.approx(expected_rank1, abs=1e-3)


def model_features(model, loader):
    """L2-normalised features of every test image, the model called directly."""
    with torch.no_grad():
        return torch.nn.functional.normalize(torch.cat([model(b) for b in loader]), dim=1)


def market_metrics_by_sklearn(ranked):
    """mAP and Rank-1 (in %) of a distance matrix with the Market protocol (a query's same-identity,
    same-camera gallery images left out), by scikit-learn."""
    from sklearn.metrics import average_precision_score

    g_pids, g_cams = np.asarray(ranked["g_pids"]), np.asarray(ranked["g_camids"])
    aps, hits = [], []
    for dist, pid, cam in zip(ranked["dist"], ranked["q_pids"], ranked["q_camids"]):
        keep = ~((g_pids == pid) & (g_cams == cam))
        relevant = (g_pids == pid)[keep]
        # Exactly tied distances (a random tiny ResNet's features barely differ) are ordered as
        # NumPy's argsort of the whole row orders them, FastReID's convention: score = -position.
        position = np.empty(len(dist))
        position[np.argsort(dist)] = np.arange(len(dist))
        if relevant.any():
            aps.append(average_precision_score(relevant, -position[keep]))
            hits.append(relevant[np.argmin(position[keep])])
    return 100 * np.mean(aps), 100 * np.mean(hits)


@pytest.mark.parametrize("path", [p for p in PROMPTSG_CONFIGS if os.path.basename(p) == "rn50.yml"], ids=_id)
def test_rn50_configs_run_layer4_at_last_stride_1(path):
    """Re-ID's last stride 1, as CLIP-ReID: a 16x8 map and 128 tokens at 256x128, not 8x4."""
    from fastreid.modeling.backbones import BACKBONE_REGISTRY

    cfg = load(path)
    assert cfg.MODEL.BACKBONE.LAST_STRIDE == 1 and cfg.INPUT.SIZE_TRAIN == [256, 128]
    cfg.MODEL.CLIP.NAME, cfg.MODEL.CLIP.PRETRAINED = "tiny-RN", ""
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 256, 128))
    assert backbone.visual.attnpool.grid_size == (16, 8) and out.tokens.shape == (1, 128, 64)
