"""Each FastReID compatibility patch (promptsg/engine/compat/) is needed and works.

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
from promptsg.engine import compat

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
    assert len(set(compat.APPLIED)) == len(compat.APPLIED) == 15
    assert {"read_image_rgb", "optimizer_not_contiguous", "checkpoint_load"} <= set(compat.APPLIED)


def test_fastreid_evaluator_checkpointer_and_optimizer_are_its_own_and_the_project_extends_them():
    """``import promptsg`` leaves FastReID's evaluate, save/load and build_optimizer as the wheel
    has them (their code objects come from FastReID's files); what the project adds is in
    subclasses and the Trainer's overrides, which every run and tool uses."""
    import fastreid
    import fastreid.engine.defaults as defaults
    import fastreid.solver as solver
    import fastreid.solver.build as solver_build
    from fastreid.evaluation.reid_evaluation import ReidEvaluator
    from fastreid.utils.checkpoint import Checkpointer

    from promptsg.engine.checkpoint import AtomicCheckpointer
    from promptsg.engine.evaluation import ChunkedReidEvaluator
    from promptsg.engine.trainer import Trainer

    site = os.path.dirname(fastreid.__file__)

    def fastreids(fn):
        return fn.__code__.co_filename.startswith(site + os.sep) and not getattr(fn, "_promptsg_patched", False)

    for fn in (ReidEvaluator.evaluate, Checkpointer.save, Checkpointer.load, Checkpointer._load_model,
               Checkpointer.has_checkpoint, Checkpointer.get_checkpoint_file, Checkpointer.tag_last_checkpoint,
               solver_build.build_optimizer, solver_build.get_default_optimizer_params,
               defaults.DefaultTrainer.build_evaluator.__func__, defaults.DefaultTrainer.build_optimizer.__func__):
        assert fastreids(fn), fn.__qualname__
    assert solver.build_optimizer is solver_build.build_optimizer is defaults.build_optimizer
    assert issubclass(ChunkedReidEvaluator, ReidEvaluator) and issubclass(AtomicCheckpointer, Checkpointer)
    assert issubclass(Trainer, defaults.DefaultTrainer)
    for name in ("build_evaluator", "build_optimizer", "build_hooks", "build_writers", "resume_or_load"):
        assert name in vars(Trainer), name


def test_fastreid_imports_only_with_the_import_aliases():
    code = "import fastreid.data, fastreid.evaluation, fastreid.engine"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bare.returncode != 0 and ("ImportError" in bare.stderr or "torch._six" in bare.stderr)
    patched = subprocess.run([sys.executable, "-c", "import promptsg; " + code], capture_output=True, text=True)
    assert patched.returncode == 0, patched.stderr


@pytest.mark.parametrize("trainer", ["fastreid", "project"])
def test_one_optimizer_step_changes_backbone_weights(trainer):
    """FastReID's own DefaultTrainer.build_optimizer (ContiguousParams requested) and the project's."""
    from fastreid.engine import DefaultTrainer
    from fastreid.modeling import build_model

    from promptsg.engine.trainer import Trainer

    DefaultTrainer = Trainer if trainer == "project" else DefaultTrainer
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
    monkeypatch.setattr(compat.evaluation.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "make: gcc: not found"))
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


@pytest.mark.parametrize("project", [False, True])
def test_checkpoint_with_numpy_objects_loads(tmp_path, project):
    from fastreid.utils.checkpoint import Checkpointer

    from promptsg.engine.checkpoint import AtomicCheckpointer

    Checkpointer = AtomicCheckpointer if project else Checkpointer
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": np.int64(7), "metric": np.float64(0.5)}, path)
    target = torch.nn.Linear(3, 2)
    extra = Checkpointer(target).load(str(path))
    assert int(extra["epoch"]) == 7
    torch.testing.assert_close(target.weight, model.weight)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from promptsg.engine.checkpoint import AtomicCheckpointer as Checkpointer

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

    from promptsg.engine.trainer import Trainer

    merged, _ = Trainer.build_optimizer(cfg, merged_model)
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


# ---- 12-13. GPU stream races: the loss log and DataLoaderX's batches ----

class ScaledLosses(torch.nn.Module):
    """Two losses of one weight, ``loss_a = w * x`` and ``loss_b = 2 * w * x``, for a batch x."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return {"loss_a": self.w * x, "loss_b": 2 * self.w * x}


def _simple_trainer(inputs, device="cpu"):
    from fastreid.engine.train_loop import SimpleTrainer

    model = ScaledLosses().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)      # w: 1 -> 1 - 1.5 x per step
    return SimpleTrainer(model, [torch.tensor(x, device=device) for x in inputs], optimizer, None)


def _history(storage, name):
    return storage.history(name).values() if name in storage.histories() else []


def test_deferred_loss_log_writes_fastreid_values_under_their_own_iteration(monkeypatch):
    """The waiting path (used on CUDA), run on the CPU: each step's losses are written at the next
    step, under their own iteration, with FastReID's values, total and data time."""
    monkeypatch.setattr(compat.training, "DEFERRED_LOSS_LOG_DEVICES", ("cuda", "cpu"))
    inputs = [1.0, 0.5, 0.25]
    trainer = _simple_trainer(inputs)
    w = 1.0
    expected = []                                    # hand-computed (loss_a, loss_b, total) per step
    for x in inputs:
        expected.append((w * x, 2 * w * x, 3 * w * x))
        w -= 0.5 * 3 * x
    with EventStorage(0) as storage:
        for step in range(3):
            trainer.iter = storage.iter = step
            trainer.run_step()
            assert [it for _, it in _history(storage, "loss_a")] == list(range(step))  # one step late
            assert storage.iter == step
        trainer.flush_metrics()
        logged = [(a, b, t) for (a, _), (b, _), (t, _) in zip(
            *(_history(storage, name) for name in ("loss_a", "loss_b", "total_loss")))]
        assert [it for _, it in _history(storage, "total_loss")] == [0, 1, 2]
        assert [it for _, it in _history(storage, "data_time")] == [0, 1, 2]
    assert [v for row in logged for v in row] == pytest.approx([v for row in expected for v in row])

    fastreid = _simple_trainer(inputs)               # FastReID's own log, at once
    fastreid._write_metrics = lambda *args: fastreid.fastreid_write_metrics(*args)
    with EventStorage(0) as reference:
        for step in range(3):
            fastreid.iter = reference.iter = step
            fastreid.run_step()
    for name in ("loss_a", "loss_b", "total_loss"):
        assert _history(storage, name) == _history(reference, name)  # the same floats, iterations


def test_deferred_loss_log_names_the_iteration_of_a_nan_loss(monkeypatch):
    monkeypatch.setattr(compat.training, "DEFERRED_LOSS_LOG_DEVICES", ("cuda", "cpu"))
    trainer = _simple_trainer([1.0, float("nan"), 1.0])
    with EventStorage(0) as storage:
        for step in range(2):
            trainer.iter = storage.iter = step
            trainer.run_step()                       # the NaN of step 1 is not read yet
        trainer.iter = storage.iter = 2
        with pytest.raises(FloatingPointError, match="^iteration 1: loss_a, loss_b not finite"):
            trainer.run_step()


def test_default_trainer_writes_the_last_loss_of_each_epoch_at_once(monkeypatch):
    """The epoch's hooks (writers, checkpoint, evaluation) run after its last step: they must see it."""
    from types import SimpleNamespace

    from fastreid.engine import DefaultTrainer

    monkeypatch.setattr(compat.training, "DEFERRED_LOSS_LOG_DEVICES", ("cuda", "cpu"))
    inner = _simple_trainer([1.0] * 6)
    trainer = SimpleNamespace(_trainer=inner, iters_per_epoch=3)
    with EventStorage(0) as storage:
        seen = []
        for step in range(6):
            trainer.iter = storage.iter = step
            DefaultTrainer.run_step(trainer)
            seen.append([it for _, it in _history(storage, "loss_a")][-1:])
    assert seen == [[], [0], [2], [2], [3], [5]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("log", ["patched", "fastreid"])
def test_cuda_loss_log_reads_the_loss_the_gpu_wrote(log):
    """The GPU is kept busy before it writes the loss. FastReID's side-stream read does not wait
    for it and logs the stale 0; the patched log does not stop the host and logs 3 a step later."""
    trainer = _simple_trainer([])
    cycles = 200_000_000                             # about 0.1 s on a current GPU
    loss = torch.zeros((), device="cuda")
    if log == "patched":                             # pinned host memory is allocated once, here
        with EventStorage(4):
            trainer.iter = 4
            trainer._write_metrics({"loss_a": loss, "loss_b": loss * 2}, 0.0)
            trainer.flush_metrics()
    with EventStorage(5) as storage:
        trainer.iter = 5
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        loss.add_(3.0)                               # runs after the sleep
        if log == "fastreid":
            trainer.fastreid_write_metrics({"loss_a": loss}, 0.0)
            assert _history(storage, "total_loss") == [(0.0, 5)]
            return
        trainer._write_metrics({"loss_a": loss, "loss_b": loss * 2}, 0.0)
        after = torch.cuda.Event()
        after.record()
        assert not after.query()                     # the host did not wait for the GPU
        trainer.flush_metrics()
    assert _history(storage, "loss_a") == [(3.0, 5)] and _history(storage, "total_loss") == [(9.0, 5)]


class _ConstantImages(torch.utils.data.Dataset):
    """Image i is filled with the value i."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"images": torch.full((3, 64, 32), float(index)), "targets": index}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("loader_next", ["patched", "fastreid"])
def test_cuda_loader_batch_is_not_overwritten_before_the_training_stream_reads_it(monkeypatch, loader_next):
    """The training stream is kept busy before it reads each batch, while the host moves on and
    drops it. Without ``record_stream`` a later batch's copy reuses its memory first."""
    from fastreid.data import data_utils
    from fastreid.data.build import DataLoaderX, fast_batch_collator

    if loader_next == "fastreid":
        monkeypatch.setattr(data_utils.DataLoaderX, "__next__", data_utils.DataLoaderX.__next__.fastreid_next)
    loader = DataLoaderX(0, dataset=_ConstantImages(), batch_size=1, num_workers=0,
                         collate_fn=fast_batch_collator, pin_memory=True)
    torch.cuda.synchronize()
    sums = []
    for batch in loader:
        torch.cuda._sleep(20_000_000)                # the training stream is busy ...
        sums.append(batch["images"].sum())           # ... when it reads this batch
    read = [round(s.item() / (3 * 64 * 32)) for s in sums]
    if loader_next == "patched":
        assert read == list(range(8))
    else:
        assert read != list(range(8))                # FastReID's loader: later batches read instead
