"""Launching where users run: from the command line, under torchrun, or as a SLURM job step.

FastReID's ``launch()`` starts ``--num-gpus`` processes on each of ``--num-machines`` machines.
torchrun and srun start every process themselves and describe the run in environment variables;
a process they started is already one worker of the run, so it joins the process group as its
rank through FastReID's worker instead of starting more processes:

* torchrun (any env:// launcher): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK`` (the machine's rank; else ``RANK // LOCAL_WORLD_SIZE``), ``MASTER_ADDR`` and
  ``MASTER_PORT`` (read by torch's env:// rendezvous);
* a SLURM job step (``SLURM_STEP_ID`` set, so not the batch script itself): ``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``, the tasks per node and the first host of
  the node list; ``MASTER_ADDR`` and ``MASTER_PORT`` override the host and the port derived from
  ``SLURM_JOB_ID``.

A launcher that started one process leaves the launching to the flags. Under a launcher that
started several, a launch flag on the command line is an error naming it, never overridden.
"""
import argparse
import dataclasses
import importlib
import itertools
import os
import re
from typing import Optional

import torch
import torch.distributed as dist
from fastreid.engine import launch as fastreid_launch

from .preflight import InputError

# FastReID's launch flags, by argparse destination
FLAGS = {"num_gpus": "--num-gpus", "num_machines": "--num-machines", "machine_rank": "--machine-rank",
         "dist_url": "--dist-url"}
TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# srun's port without MASTER_PORT: SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORTS, below Linux's
# ephemeral range (32768-60999), where no outgoing connection takes it
SLURM_PORT_BASE, SLURM_PORTS = 20000, 10000

_NOT_GIVEN = object()


@dataclasses.dataclass(frozen=True)
class Launch:
    """FastReID ``launch()``'s arguments for a run, and ``local_rank`` when torchrun or srun
    started this process as one worker of it (None: ``launch()`` starts the processes)."""

    num_gpus: int                       # processes per machine
    num_machines: int
    machine_rank: int
    dist_url: str
    local_rank: Optional[int] = None
    source: str = "the command line"    # what described the run, for messages

    @property
    def world_size(self):
        return self.num_gpus * self.num_machines

    @property
    def holds_output_dir(self):
        """Whether this process holds OUTPUT_DIR for the run (its lock, replacing a previous run):
        machine 0's launcher, or global rank 0 when a launcher started each process."""
        return self.machine_rank == 0 and self.local_rank in (None, 0)


def flags_not_given():
    """A namespace for ``parser.parse_args(namespace=...)`` that keeps the launch flags a user
    left out apart from those given (``resolve_launch`` then fills them)."""
    return argparse.Namespace(**{dest: _NOT_GIVEN for dest in FLAGS})


def resolve_launch(args, parser, env=os.environ):
    """The run ``args`` (parsed into ``flags_not_given()``) asks for: torchrun's or srun's when one
    of them started this process among several, else the flags' (FastReID's defaults where left
    out). Fills the launch flags of ``args`` with it; a flag given under such a launcher is an
    ``InputError``."""
    given = {dest: getattr(args, dest) for dest in FLAGS if getattr(args, dest) is not _NOT_GIVEN}
    run = from_environment(env)
    if run is None:
        run = Launch(**{dest: given.get(dest, parser.get_default(dest)) for dest in FLAGS})
    elif given:
        flags = " and ".join(f"{FLAGS[dest]} {value}" for dest, value in given.items())
        raise InputError(f"{flags} conflict{'s' if len(given) == 1 else ''} with {run.source}, which started this "
                         f"run's processes: leave out the launch flags ({', '.join(FLAGS.values())}) under it")
    for dest in FLAGS:
        setattr(args, dest, getattr(run, dest))
    return run


def from_environment(env=os.environ):
    """The run torchrun or a SLURM job step started this process in, or None: no such launcher,
    or one that started a single process (whose other variables are then not read)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        read, world = from_torchrun, "WORLD_SIZE"
    elif env.get("SLURM_STEP_ID", "batch") not in ("batch", "extern") and "SLURM_PROCID" in env:
        read, world = from_slurm, _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    else:
        return None
    return read(env) if _number(env, world, 1) > 1 else None


def from_torchrun(env):
    """The run described by torchrun's (env://) variables."""
    missing = [name for name in TORCHRUN if not env.get(name)]
    _need(not missing, f"{', '.join(missing)} not set: a process started by torchrun has {', '.join(TORCHRUN)}")
    world, per_machine = _number(env, "WORLD_SIZE", 1), _number(env, "LOCAL_WORLD_SIZE", 1)
    rank, local_rank = _number(env, "RANK"), _number(env, "LOCAL_RANK")
    _number(env, "MASTER_PORT", 1, 65535)
    machine_rank = _number(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // per_machine
    _check_layout(world, per_machine, rank, local_rank, machine_rank,
                  ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK",
                   "GROUP_RANK" if "GROUP_RANK" in env else "RANK // LOCAL_WORLD_SIZE"),
                  "start the same --nproc-per-node on every machine")
    return Launch(per_machine, world // per_machine, machine_rank, "env://", local_rank,
                  f"torchrun (WORLD_SIZE={world}, LOCAL_WORLD_SIZE={per_machine})")


def from_slurm(env):
    """The run described by a SLURM job step's variables (one task per process)."""
    ntasks_name = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    per_node_name = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    world = _number(env, ntasks_name, 1)
    rank, local_rank, node = _number(env, "SLURM_PROCID"), _number(env, "SLURM_LOCALID"), _number(env, "SLURM_NODEID")
    counts = set(_parse(tasks_per_node, env, per_node_name))
    _need(len(counts) == 1 and min(counts) > 0,
          f"{per_node_name}={env[per_node_name]}: FastReID's launcher needs the same number of processes on every "
          f"machine (srun --ntasks-per-node)")
    per_node = counts.pop()
    _check_layout(world, per_node, rank, local_rank, node,
                  (ntasks_name, per_node_name, "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"),
                  "srun --distribution block")
    host = env.get("MASTER_ADDR") or _parse(
        expand_hostlist, env, _first(env, "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"))[0]
    if _first(env, "MASTER_PORT", "SLURM_JOB_ID") == "MASTER_PORT":
        port = _number(env, "MASTER_PORT", 1, 65535)
    else:
        port = SLURM_PORT_BASE + _number(env, "SLURM_JOB_ID") % SLURM_PORTS
    host = f"[{host}]" if ":" in host else host     # an IPv6 address
    return Launch(per_node, world // per_node, node, f"tcp://{host}:{port}", local_rank,
                  f"srun ({ntasks_name}={world}, {per_node} tasks per node)")


def launch(main_func, run, args=()):
    """``main_func(*args)`` in every process of ``run``: FastReID's ``launch()`` starts them, or,
    in a process torchrun or srun started, FastReID's worker joins the process group as its rank
    (gloo on CPUs, NCCL with the local rank's GPU otherwise)."""
    if run.local_rank is None:
        fastreid_launch(main_func, run.num_gpus, num_machines=run.num_machines, machine_rank=run.machine_rank,
                        dist_url=run.dist_url, args=args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < run.num_gpus:
        raise InputError(f"{run.source} runs {run.num_gpus} processes per machine, but this process sees "
                         f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}): each process selects its GPU by local rank, "
                         f"so it must see all the machine's GPUs")
    # the launch module's worker (the package's ``launch`` is the function): compat's on CPUs (gloo),
    # else FastReID's (NCCL, torch.cuda.set_device(local_rank))
    worker = importlib.import_module("fastreid.engine.launch")._distributed_worker
    worker(run.local_rank, main_func, run.world_size, run.num_gpus, run.machine_rank, run.dist_url, args)
    if dist.is_initialized():
        dist.destroy_process_group()


def expand_hostlist(hostlist):
    """The host names of a SLURM host list, in order: ``node[01-03,07],gpu5`` -> node01, node02,
    node03, node07, gpu5; several ranges in one name multiply (``r[1-2]n[1-2]`` -> r1n1, r1n2,
    r2n1, r2n2). A range keeps the zero padding of its first number. ValueError if malformed."""
    names = re.findall(r"(?:\[[^\[\]]*\]|[^,\[\]])+", hostlist)
    if not names or ",".join(names) != hostlist:
        raise ValueError(f"not a SLURM host list: {hostlist!r}")
    hosts = []
    for name in names:
        parts = re.split(r"\[([^\]]*)\]", name)    # literal, range, literal, ..., literal
        choices = [[part] if i % 2 == 0 else _expand_range(part, hostlist) for i, part in enumerate(parts)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def tasks_per_node(counts):
    """SLURM's tasks per node, one number per node: ``2(x3),1`` -> [2, 2, 2, 1]. ValueError if malformed."""
    nodes = []
    for item in counts.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"not a SLURM task count list: {counts!r}")
        nodes += [int(match[1])] * int(match[2] or 1)
    return nodes


def _expand_range(text, hostlist):
    """``01-03,07`` -> 01, 02, 03, 07."""
    numbers = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise ValueError(f"not a SLURM host list: {hostlist!r}")
        width = len(match[1])
        numbers += [str(n).zfill(width) for n in range(int(match[1]), int(match[2] or match[1]) + 1)]
    return numbers


def _check_layout(world, per_machine, rank, local_rank, machine_rank, names, fix):
    """FastReID's layout: the same number of processes on every machine and global rank =
    machine rank x processes per machine + local rank. ``names``: the variables each value came
    from (world, per machine, rank, local rank, machine rank); ``fix``: how to launch instead."""
    world_name, per_name, rank_name, local_name, machine_name = names
    _need(world % per_machine == 0, f"{world_name}={world} is not a multiple of {per_name}={per_machine}: "
          f"FastReID's launcher needs the same number of processes on every machine")
    _need(rank < world, f"{rank_name}={rank} is not below {world_name}={world}")
    _need(local_rank < per_machine, f"{local_name}={local_rank} is not below {per_name}={per_machine}")
    _need(rank == machine_rank * per_machine + local_rank,
          f"{rank_name}={rank}, but {machine_name} x {per_name} + {local_name} = {machine_rank} x {per_machine} + "
          f"{local_rank} = {machine_rank * per_machine + local_rank}: FastReID's launcher numbers the processes "
          f"machine by machine ({fix})")


def _first(env, *names):
    """The first of ``names`` set in ``env``; an InputError naming them all when none is."""
    for name in names:
        if env.get(name):
            return name
    raise InputError(f"{' or '.join(names)} not set in this SLURM job step")


def _number(env, name, low=0, high=None):
    """``env[name]`` as a whole number in [low, high]; an InputError naming the variable otherwise."""
    value = env.get(name, "")
    if not value:
        raise InputError(f"{name} not set")
    whole = value.isascii() and value.isdigit()
    if not (whole and int(value) >= low and (high is None or int(value) <= high)):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise InputError(f"{name}={value!r} is not a whole number {bounds}")
    return int(value)


def _parse(parser, env, name):
    """``parser(env[name])``, with an InputError naming the variable when it is malformed."""
    try:
        return parser(env[name])
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None


def _need(ok, message):
    if not ok:
        raise InputError(message)
