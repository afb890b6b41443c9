"""Several processes train what one process trains (promptsg.utils.distributed, compat._global_batches):
global-batch BatchNorm and losses against one process on the whole batch, the sampler's batches
for any number of processes, the test loader's workers, and tools/train_net.py run as 1 process,
2 processes and 2 machines x 1 process (gloo on localhost) ending at the same weights, and a
2-process evaluation giving one process's metrics; the 2 processes of torchrun and of a SLURM job
step (promptsg.engine.launcher) end at the weights of --num-gpus 2."""
import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from fastreid.data import build_reid_test_loader, samplers
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.modeling import build_model
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng
from promptsg.utils.distributed import GlobalBatchNorm1d, gather_batch
from promptsg.modeling.losses import triplet_loss
from promptsg.modeling.supcon import symmetric_supcon_loss

from tiny_runs import PROMPTSG_CFG, ROOT, TINY, TRAIN_NET, run

BATCH, WORLD = 16, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the building blocks, in two gloo processes against one process on the whole batch ----

def toy_problem():
    """A linear layer, a BatchNorm and a batch of 4 identities x 4 images, seeded."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 6)
    targets = torch.arange(4).repeat_interleave(4)
    text = torch.randn(BATCH, 6)
    linear = torch.nn.Linear(6, 6)
    bn = GlobalBatchNorm1d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return x, targets, text, linear, bn


def toy_losses(feat, targets, text, rows):
    """What PromptSG's step computes: a per-sample term on this process's rows (a stand-in for
    the ID loss) and the batch-level terms on the gathered batch."""
    per_sample = (feat * torch.linspace(-1, 1, feat.shape[1])).sum(1).mean()
    everything, all_targets = gather_batch(feat), gather_batch(targets[rows])
    all_text = gather_batch(text[rows])
    return (per_sample + triplet_loss(everything, all_targets, 0.3, False, True)
            + symmetric_supcon_loss(everything, all_text, all_targets, 0.1))


def _toy_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=WORLD, rank=rank)
    x, targets, text, linear, bn = toy_problem()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(linear, bn))
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    loss = toy_losses(model(x[rows]), targets, text, rows)
    loss.backward()
    if rank == 0:
        torch.save({"grads": [p.grad for p in model.parameters()],
                    "running": [bn.running_mean, bn.running_var]}, out)
    dist.destroy_process_group()


def test_global_batchnorm_and_gathered_losses_give_the_gradient_of_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_toy_worker, args=(free_port(), out), nprocs=WORLD)
    two = torch.load(out)

    x, targets, text, linear, bn = toy_problem()
    feat = bn(linear(x))        # one process: plain BatchNorm1d over the whole batch
    loss = toy_losses(feat, targets, text, slice(None))
    loss.backward()
    # DDP averages the processes' gradients; the per-sample term's average is its global mean.
    # (The linear bias feeds a BatchNorm: its true gradient is 0, its computed one float noise.)
    for got, want in zip(two["grads"], [p.grad for p in (*linear.parameters(), *bn.parameters())]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(two["running"][0], bn.running_mean, atol=1e-6)
    assert torch.allclose(two["running"][1], bn.running_var, atol=1e-6)   # unbiased, global count


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    ours, plain = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    assert torch.equal(ours(x), plain(x))
    assert torch.equal(ours.running_var, plain.running_var)
    assert set(ours.state_dict()) == set(plain.state_dict())     # same checkpoint keys


# ---- FastReID's identity sampler: the same global batches for any number of processes ----

def sampler_stream(monkeypatch, items, world, rank, patched=True):
    monkeypatch.setattr(comm, "get_world_size", lambda: world)
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    sampler = samplers.NaiveIdentitySampler.__new__(samplers.NaiveIdentitySampler)
    init = samplers.NaiveIdentitySampler.__init__
    (init if patched else init.fastreid_init)(sampler, items, BATCH // world, 4, seed=7)
    return list(itertools.islice(iter(sampler), 6 * BATCH // world))


def global_batches(monkeypatch, items, patched=True):
    shares = [sampler_stream(monkeypatch, items, WORLD, r, patched) for r in range(WORLD)]
    mini = BATCH // WORLD
    return [i for step in range(6) for share in shares for i in share[step * mini:(step + 1) * mini]]


def test_two_processes_draw_the_batches_of_one(datasets_root, monkeypatch):
    items = DATASET_REGISTRY.get("SyntheticMarketTiny")(root=str(datasets_root)).train
    one = sampler_stream(monkeypatch, items, 1, 0)
    assert global_batches(monkeypatch, items) == one
    # FastReID's own sampler drew other batches with two processes (the bug the patch fixes).
    assert global_batches(monkeypatch, items, patched=False) != one
    # Each process's share of a step holds whole identities (triplet positives stay together).
    pids = [items[i][1] for i in sampler_stream(monkeypatch, items, WORLD, 0)[:BATCH // WORLD]]
    assert all(pids.count(p) == 4 for p in pids)


# ---- the test loader ----

def test_test_loader_takes_num_workers_from_the_config_and_forks(datasets_root):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    items = DATASET_REGISTRY.get("SyntheticMarketTiny")(root=str(datasets_root))
    from fastreid.data.common import CommDataset
    test_set = CommDataset(items.query + items.gallery, None, relabel=False)
    for workers in (0, 2):
        cfg.DATALOADER.NUM_WORKERS = workers
        loader, _ = build_reid_test_loader(cfg, test_set=test_set, num_query=len(items.query))
        assert loader.num_workers == workers                       # FastReID's: always 4
        if workers:
            assert loader.multiprocessing_context.get_start_method() == "fork"


def test_every_fastreid_module_builds_the_test_loader_with_the_config_s_workers(datasets_root, monkeypatch):
    """The trainer's path (``DefaultTrainer.build_test_loader``, through fastreid.engine.defaults'
    own name for the builder) takes DATALOADER.NUM_WORKERS too, and no FastReID module a run
    imports keeps a name for FastReID's unpatched builder."""
    import sys

    import fastreid.evaluation  # noqa: F401  (with the engine and the data package: what a run imports)
    from fastreid.engine import DefaultTrainer

    holders = {name: m.build_reid_test_loader for name, m in list(sys.modules.items())
               if name.startswith("fastreid") and hasattr(m, "build_reid_test_loader")}
    assert {"fastreid.data", "fastreid.data.build", "fastreid.engine.defaults"} <= set(holders)
    assert all(getattr(f, "_promptsg_patched", False) for f in holders.values()), holders

    monkeypatch.setenv("FASTREID_DATASETS", str(datasets_root))
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.DATALOADER.NUM_WORKERS = 0
    loader, num_query = DefaultTrainer.build_test_loader(cfg, "SyntheticMarketTiny")
    assert loader.num_workers == 0                                 # FastReID's: always 4
    assert num_query == len(DATASET_REGISTRY.get("SyntheticMarketTiny")(root=str(datasets_root)).query)


# ---- tools/train_net.py: 1 process, 2 processes, 2 machines x 1 process ----

# Deterministic inputs (no flip, no padding; the synthetic config has no random erasing): each
# process draws its own augmentation, so with it runs agree in distribution, not in value. SGD:
# Adam divides each step by the gradient's running RMS, so a gradient that is mathematically zero
# (the biases just before a BatchNorm) turns float noise into full-size steps (docs/DISTRIBUTED.md).
EQUIVALENCE = [*TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1",
               "INPUT.FLIP.ENABLED", "False", "INPUT.PADDING.ENABLED", "False",
               "SOLVER.OPT", "SGD", "SOLVER.BASE_LR", "0.005"]
TOLERANCE = 1e-4     # measured: at most 5.5e-6 after 4 steps that move some weights by 2.3


def train_net(args, root, launcher=(sys.executable,), env=os.environ):
    """tools/train_net.py started by ``launcher`` (a command line) in ``env``; the Popen."""
    env = dict(env, FASTREID_DATASETS=str(root), PYTHONWARNINGS="ignore")
    return subprocess.Popen([*launcher, TRAIN_NET, "--config-file", PROMPTSG_CFG, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return out


def read(path):
    with open(path) as f:
        return json.load(f)


def final_weights(out_dir):
    return torch.load(out_dir / "model_final.pth", weights_only=False)["model"]


def initial_weights():
    """The model train_net.py starts from: built after seeding with SEED (0) in one process."""
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list([*EQUIVALENCE, "MODEL.HEADS.NUM_CLASSES", "8"])
    seed_all_rng(0)
    return build_model(cfg).state_dict()


@pytest.fixture(scope="module")
def two_processes(datasets_root, tmp_path_factory):
    """The equivalence run with --num-gpus 2: its OUTPUT_DIR and its log."""
    out = tmp_path_factory.mktemp("two")
    log = finish(train_net(["--num-gpus", "2", "--dist-url", "auto", *EQUIVALENCE, "OUTPUT_DIR", str(out)],
                           datasets_root))
    return out, log


def assert_same_weights(out_dir, reference_dir):
    got, want = final_weights(out_dir), final_weights(reference_dir)
    for k in want:
        if want[k].is_floating_point():
            assert (got[k] - want[k]).abs().max() <= TOLERANCE, k


def test_one_process_two_processes_and_two_machines_train_the_same_weights(datasets_root, tmp_path, two_processes):
    two_dir, two_log = two_processes
    port = free_port()
    machines = [train_net(["--num-machines", "2", "--machine-rank", str(rank), "--dist-url",
                           f"tcp://127.0.0.1:{port}", *EQUIVALENCE, "OUTPUT_DIR", str(tmp_path / f"machine{rank}")],
                          datasets_root) for rank in range(2)]
    for process in machines:
        finish(process)
    finish(train_net([*EQUIVALENCE, "OUTPUT_DIR", str(tmp_path / "one")], datasets_root))
    assert "World size: 2" in two_log
    # Evaluation shards the test set over both processes and gathers it: the metrics of one
    # process evaluating the same checkpoint.
    single = run(["--config-file", PROMPTSG_CFG, "--eval-only", *EQUIVALENCE, "MODEL.WEIGHTS",
                  str(two_dir / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "eval")], datasets_root)
    assert single.returncode == 0, single.stderr[-3000:]
    assert read(tmp_path / "eval" / "eval_results.json")["mAP"] == pytest.approx(
        read(two_dir / "results.json")["mAP"], abs=1e-6)

    one, two, machines = (final_weights(d) for d in (tmp_path / "one", two_dir, tmp_path / "machine0"))
    assert not (tmp_path / "machine1" / "model_final.pth").exists()   # only global rank 0 writes
    start = initial_weights()
    assert torch.equal(start["text.positional_embedding"], one["text.positional_embedding"])  # same init
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start and one[k].is_floating_point())
    assert moved > 0.5                                              # the steps changed the model
    for k in one:
        if one[k].is_floating_point():
            assert (two[k] - one[k]).abs().max() <= TOLERANCE, k
            assert (machines[k] - two[k]).abs().max() <= TOLERANCE, k


# ---- the same run started by torchrun and by a SLURM job step (promptsg.engine.launcher) ----

def ranks_logged(out_dir, log):
    """The "Rank of current process" lines of rank 0 (its output) and rank 1 (its log file)."""
    with open(out_dir / "log.txt.rank1") as f:
        rank1 = f.read()
    return [line.split("]: ")[-1] for line in log.splitlines() if "Rank of current process" in line] + \
        [line.split("INFO: ")[-1] for line in rank1.splitlines() if "Rank of current process" in line]


def test_torchrun_s_two_processes_train_the_weights_of_num_gpus_2(datasets_root, tmp_path, two_processes):
    """Each process torchrun starts joins the run as its rank (none starts more), and only rank 0
    takes the OUTPUT_DIR lock (a second taker would stop the run)."""
    out = tmp_path / "torchrun"
    log = finish(train_net([*EQUIVALENCE, "OUTPUT_DIR", str(out)], datasets_root, launcher=(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")))
    assert ranks_logged(out, log) == ["Rank of current process: 0. World size: 2",
                                      "Rank of current process: 1. World size: 2"]
    assert_same_weights(out, two_processes[0])


def test_a_slurm_job_step_s_two_tasks_train_the_weights_of_num_gpus_2(datasets_root, tmp_path, two_processes):
    """The 2 tasks srun --ntasks-per-node 2 would start on one node, started here by hand."""
    out = tmp_path / "slurm"
    launchers = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launchers}
    step = dict(clean, SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2",
                SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    tasks = [train_net([*EQUIVALENCE, "OUTPUT_DIR", str(out)], datasets_root,
                       env=dict(step, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))) for rank in range(2)]
    logs = [finish(task) for task in tasks]
    assert ranks_logged(out, logs[0]) == ["Rank of current process: 0. World size: 2",
                                      "Rank of current process: 1. World size: 2"]
    assert_same_weights(out, two_processes[0])
