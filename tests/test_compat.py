"""Each FastReID compatibility patch (promptsg/compat.py) is needed and works.

Every test drives FastReID's own public code path; without the patch it named, the test fails
(import error, silent no-op, TypeError, CUDA assertion, sys.exit, or a lost checkpoint).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import promptsg  # noqa: F401
from promptsg import compat

from fastreid.config import get_cfg
from fastreid.data.common import CommDataset
from fastreid.utils.events import EventStorage


def _tiny_baseline_cfg(num_classes=4):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.DEPTH = "18x"
    cfg.MODEL.BACKBONE.FEAT_DIM = 512
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.HEADS.WITH_BNNECK = True
    cfg.MODEL.LOSSES.NAME = ("CrossEntropyLoss", "TripletLoss")
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.OPT = "Adam"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    cfg.INPUT.SIZE_TEST = [64, 32]
    return cfg


def _batch(n_ids=4, per_id=2, size=(64, 32)):
    torch.manual_seed(0)
    targets = torch.arange(n_ids).repeat_interleave(per_id)
    images = torch.rand(len(targets), 3, *size) * 255
    return {"images": images, "targets": targets, "camids": torch.zeros_like(targets)}


def test_all_patches_are_applied_once():
    assert compat.apply_all() == compat.APPLIED
    assert len(set(compat.APPLIED)) == len(compat.APPLIED) == 11


def test_fastreid_imports_only_with_the_import_aliases():
    code = "import fastreid.data, fastreid.evaluation, fastreid.engine"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bare.returncode != 0 and ("ImportError" in bare.stderr or "torch._six" in bare.stderr)
    patched = subprocess.run([sys.executable, "-c", "import promptsg; " + code], capture_output=True, text=True)
    assert patched.returncode == 0, patched.stderr


def test_one_optimizer_step_changes_backbone_weights():
    from fastreid.engine import DefaultTrainer
    from fastreid.modeling import build_model

    cfg = _tiny_baseline_cfg()
    model = build_model(cfg)
    optimizer, _ = DefaultTrainer.build_optimizer(cfg, model)
    before = model.backbone.conv1.weight.detach().clone()
    with EventStorage(0):
        losses = model(_batch())
    optimizer.zero_grad()  # torch 2.x: set_to_none=True, the call that broke ContiguousParams
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_upstream_contiguous_optimizer_never_steps():
    """Documents the silent breakage the patch avoids: FastReID's default build never updates."""
    from fastreid.modeling import build_model
    from fastreid.solver.build import get_default_optimizer_params
    from fastreid.utils.params import ContiguousParams

    cfg = _tiny_baseline_cfg()
    model = build_model(cfg)
    params = ContiguousParams(get_default_optimizer_params(model, base_lr=1e-3, weight_decay=0.0))
    optimizer = torch.optim.Adam(params.contiguous())
    before = model.backbone.conv1.weight.detach().clone()
    with EventStorage(0):
        losses = model(_batch())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert torch.equal(before, model.backbone.conv1.weight)


def test_random_affine_augmentation_builds_and_runs():
    from fastreid.data.transforms import build_transforms

    cfg = _tiny_baseline_cfg()
    cfg.INPUT.AFFINE.ENABLED = True
    transform = build_transforms(cfg, is_train=True)
    out = transform(Image.new("RGB", (32, 64), (200, 10, 10)))
    assert out.shape == (3, 64, 32)


@pytest.fixture
def image_items(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):
        path = tmp_path / f"{i // 4:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path)
        items.append((str(path), f"toy_{i // 4}", f"toy_{i % 2}"))
    return items


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the data loader")
def test_train_loader_runs_without_cuda(image_items):
    from fastreid.data import build_reid_train_loader, samplers
    from fastreid.data.transforms import build_transforms

    cfg = _tiny_baseline_cfg()
    train_set = CommDataset(image_items, build_transforms(cfg, is_train=True), relabel=True)
    sampler = samplers.NaiveIdentitySampler(train_set.img_items, 8, 2)
    loader = build_reid_train_loader(train_set=train_set, sampler=sampler, total_batch_size=8, num_workers=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 64, 32) and batch["images"].device.type == "cpu"
    assert len(set(batch["targets"].tolist())) == 4


def _eval_inputs(num_ids=5, per_id=14, dim=8):
    """Well separated identity clusters, query from camera 0, gallery from camera 1."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(num_ids, dim)) * 10
    feats, pids, camids = [], [], []
    for cam in (0, 1):
        for pid in range(num_ids):
            for _ in range(per_id if cam else 1):
                feats.append(centers[pid] + rng.normal(size=dim) * 0.1)
                pids.append(pid)
                camids.append(cam)
    return torch.tensor(np.array(feats), dtype=torch.float32), torch.tensor(pids), torch.tensor(camids), num_ids


def _evaluate(cfg):
    from fastreid.evaluation import ReidEvaluator

    feats, pids, camids, num_query = _eval_inputs()
    evaluator = ReidEvaluator(cfg, num_query)
    evaluator.process({"targets": pids, "camids": camids}, feats)
    return evaluator.evaluate()


def test_evaluator_falls_back_to_python_ranker_instead_of_exiting(monkeypatch):
    import fastreid.evaluation.rank as rank

    monkeypatch.setattr(rank, "IS_CYTHON_AVAI", False)
    monkeypatch.setitem(sys.modules, "fastreid.evaluation.rank_cylib.rank_cy", None)  # not built
    monkeypatch.setattr(compat.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "make: gcc: not found"))
    with pytest.warns(UserWarning, match="Python ranker"):
        results = _evaluate(_tiny_baseline_cfg())
    assert results["Rank-1"] == pytest.approx(100.0) and results["mAP"] == pytest.approx(100.0)


def test_python_and_cython_rankers_agree():
    import fastreid.evaluation.rank as rank

    if not compat.build_cython_ranker():
        pytest.skip("the Cython ranker cannot be built on this machine")
    rng = np.random.default_rng(1)
    dist = rng.random((6, 80)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 4, 6), rng.integers(0, 4, 80)
    q_cams, g_cams = rng.integers(0, 2, 6), rng.integers(0, 3, 80)
    q_pids[:] = g_pids[:6]  # every query has gallery matches
    g_cams[:6] = (q_cams + 1) % 3
    cy = rank.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, use_cython=True)
    py = rank.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, use_cython=False)
    np.testing.assert_allclose(cy[0], py[0], rtol=1e-6)
    np.testing.assert_allclose(np.mean(cy[1]), np.mean(py[1]), rtol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of re-ranking")
def test_reranking_runs_on_cpu():
    cfg = _tiny_baseline_cfg()
    cfg.TEST.RERANK.ENABLED = True
    cfg.TEST.RERANK.K1, cfg.TEST.RERANK.K2 = 4, 2
    results = _evaluate(cfg)
    assert results["mAP"] == pytest.approx(100.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of AMP")
def test_amp_trainer_falls_back_to_fp32_on_cpu(image_items, caplog):
    import fastreid.engine.defaults as defaults
    from fastreid.modeling import build_model

    cfg = _tiny_baseline_cfg()
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = iter([_batch()])
    trainer = defaults.AMPTrainer(model, batches, optimizer, None)
    before = model.backbone.conv1.weight.detach().clone()
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
    assert "CUDA is not available" in caplog.text
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_ddp_wrapper_drops_cuda_device_ids_for_cpu_modules(monkeypatch):
    import fastreid.engine.defaults as defaults

    seen = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, device_ids=None, **k: seen.update(ids=device_ids))
    defaults.DistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[0], broadcast_buffers=False)
    assert seen["ids"] is None


def test_launch_uses_gloo_workers_without_cuda():
    launch = sys.modules["fastreid.engine.launch"]
    if torch.cuda.is_available():
        assert launch._distributed_worker is launch._promptsg_original_worker
    else:
        assert launch._distributed_worker is compat._distributed_worker


def test_checkpoint_with_numpy_objects_loads(tmp_path):
    from fastreid.utils.checkpoint import Checkpointer

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": np.int64(7), "metric": np.float64(0.5)}, path)
    target = torch.nn.Linear(3, 2)
    extra = Checkpointer(target).load(str(path))
    assert int(extra["epoch"]) == 7
    torch.testing.assert_close(target.weight, model.weight)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from fastreid.utils.checkpoint import Checkpointer

    model = torch.nn.Linear(3, 2)
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_best")
    good = (tmp_path / "model_best.pth").read_bytes()

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_best")
    assert (tmp_path / "model_best.pth").read_bytes() == good
    assert os.path.exists(tmp_path / "last_checkpoint")


def test_optimizer_groups_share_hyper_parameters_and_update_exactly_as_per_parameter_groups():
    from fastreid.engine import DefaultTrainer
    from fastreid.modeling import build_model
    from fastreid.solver import build_lr_scheduler
    from fastreid.solver.build import get_default_optimizer_params

    cfg = _tiny_baseline_cfg()
    cfg.SOLVER.HEADS_LR_FACTOR = 10.0
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    cfg.SOLVER.WARMUP_ITERS = 3
    torch.manual_seed(0)
    merged_model = build_model(cfg)
    reference_model = build_model(cfg)
    reference_model.load_state_dict(merged_model.state_dict())

    merged, _ = DefaultTrainer.build_optimizer(cfg, merged_model)
    lrs = {(g["lr"], g["weight_decay"]) for g in merged.param_groups}
    assert len(merged.param_groups) == len(lrs) <= 4          # one group per distinct setting
    per_param = [dict(g, params=[p]) for g in get_default_optimizer_params(
        reference_model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM, bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        heads_lr_factor=cfg.SOLVER.HEADS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        for p in g["params"]]
    reference = torch.optim.Adam(per_param)
    assert len(reference.param_groups) == sum(1 for p in reference_model.parameters() if p.requires_grad)

    schedulers = [build_lr_scheduler(cfg, opt, iters_per_epoch=10) for opt in (merged, reference)]
    for step in range(4):
        for model, opt, sched in zip((merged_model, reference_model), (merged, reference), schedulers):
            with EventStorage(step):
                losses = model(_batch())
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            sched["warmup_sched"].step()
    for (name, a), b in zip(merged_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
