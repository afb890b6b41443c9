"""FastReID's launch() and DistributedDataParallel on machines without CUDA."""
import os
import sys

import torch

from .patch import _patch


# --------------------------------------------------------------------------------------------
# 8c. launch() uses NCCL + CUDA for more than one process; DDP is built with CUDA device_ids
# --------------------------------------------------------------------------------------------
def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args):
    """FastReID's worker, with the gloo backend and no CUDA calls when CUDA is unavailable."""
    import torch.distributed as dist
    from fastreid.utils import comm

    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank)
    comm.synchronize()
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    main_func(*args)


def _ddp(module, device_ids=None, **kwargs):
    """DistributedDataParallel that leaves out ``device_ids`` for a module on the CPU."""
    if next(module.parameters()).device.type == "cpu":
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


@_patch
def _launch_on_cpu():
    import fastreid.engine.defaults as defaults

    launch = sys.modules["fastreid.engine.launch"]  # the package re-exports a function of that name
    if getattr(launch, "_promptsg_original_worker", None) is None:
        launch._promptsg_original_worker = launch._distributed_worker
    if not torch.cuda.is_available():
        launch._distributed_worker = _distributed_worker
    defaults.DistributedDataParallel = _ddp
