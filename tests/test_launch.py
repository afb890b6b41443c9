"""Launching where users run (promptsg.engine.launcher): torchrun's and a SLURM job step's
variables read into FastReID's launch arguments, SLURM's compact host and task lists, launch
flags that conflict with a launcher, and bad values, each a one-line error naming it. The runs
themselves (torchrun's and srun's processes train the weights of --num-gpus 2) are in
tests/test_distributed.py."""
import os
import subprocess
import sys

import pytest

import promptsg  # noqa: F401
from promptsg.engine.launcher import (Launch, expand_hostlist, flags_not_given, from_environment, resolve_launch,
                                      tasks_per_node)
from promptsg.engine.preflight import InputError
from fastreid.engine import default_argument_parser

from tiny_runs import PROMPTSG_CFG, ROOT, TRAIN_NET, one_line_error

# what torchrun --nnodes 2 --nproc-per-node 2 gives the second process of the second machine
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
# what srun -N 2 --ntasks-per-node 2 gives task 3 (the second task of the second node) of job 123456
SLURM = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
         "SLURM_JOB_NODELIST": "gpu[017-018]"}


def resolved(argv, env):
    parser = default_argument_parser()
    args = parser.parse_args(["--config-file", "x.yml", *argv], namespace=flags_not_given())
    return resolve_launch(args, parser, env), args


def without(env, *names):
    return {k: v for k, v in env.items() if k not in names}


# ---- torchrun (env://) ----

def test_torchrun_s_variables_become_fastreid_s_launch_arguments():
    run, args = resolved([], TORCHRUN)
    assert run == Launch(num_gpus=2, num_machines=2, machine_rank=1, dist_url="env://", local_rank=1,
                         source="torchrun (WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)")
    assert (args.num_gpus, args.num_machines, args.machine_rank, args.dist_url) == (2, 2, 1, "env://")
    assert run.world_size == 4 and not run.holds_output_dir


def test_without_group_rank_the_machine_is_the_rank_over_the_processes_per_machine():
    assert from_environment(without(TORCHRUN, "GROUP_RANK")).machine_rank == 3 // 2


def test_only_global_rank_0_holds_the_output_dir():
    ranks = [dict(TORCHRUN, RANK=str(r), LOCAL_RANK=str(r % 2), GROUP_RANK=str(r // 2)) for r in range(4)]
    assert [from_environment(env).holds_output_dir for env in ranks] == [True, False, False, False]
    assert Launch(2, 1, 0, "auto").holds_output_dir                 # the launcher of --num-gpus 2


def test_without_a_launcher_the_flags_or_fastreid_s_defaults_decide():
    parser = default_argument_parser()
    run, args = resolved([], {})
    assert run == Launch(1, 1, 0, parser.get_default("dist_url"))
    run, _ = resolved(["--num-gpus", "2", "--dist-url", "auto"], {})
    assert (run.num_gpus, run.num_machines, run.dist_url, run.local_rank) == (2, 1, "auto", None)


def test_a_launcher_that_started_one_process_leaves_the_launching_to_the_flags():
    one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    run, _ = resolved(["--num-gpus", "2"], one)
    assert (run.num_gpus, run.local_rank) == (2, None)
    run, _ = resolved(["--num-gpus", "2"], dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                                                SLURM_NODEID="0", SLURM_TASKS_PER_NODE="1"))
    assert (run.num_gpus, run.local_rank) == (2, None)


@pytest.mark.parametrize("argv, named", [
    (["--num-gpus", "2"], "--num-gpus 2 conflicts with torchrun (WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)"),
    (["--num-gpus", "1"], "--num-gpus 1 conflicts"),                # FastReID's default, given: still a conflict
    (["--machine-rank", "1", "--dist-url", "tcp://h:1"], "--machine-rank 1 and --dist-url tcp://h:1 conflict"),
    (["--num-machines=2"], "--num-machines 2 conflicts"),
])
def test_a_launch_flag_given_under_torchrun_is_an_error_naming_it(argv, named):
    with pytest.raises(InputError, match="leave out the launch flags") as error:
        resolved(argv, TORCHRUN)
    assert named in str(error.value)


def test_a_launch_flag_given_in_a_slurm_job_step_is_an_error_naming_it():
    with pytest.raises(InputError, match=r"--num-gpus 8 conflicts with srun \(SLURM_NTASKS=4, 2 tasks per node\)"):
        resolved(["--num-gpus", "8"], SLURM)


@pytest.mark.parametrize("change, message", [
    ({"RANK": "one"}, "RANK='one' is not a whole number 0 or more"),
    ({"RANK": "-1"}, "RANK='-1' is not a whole number 0 or more"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number 1 or more"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a whole number from 1 to 65535"),
    ({"RANK": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({"WORLD_SIZE": "3"}, "WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
    ({"GROUP_RANK": "0"}, "RANK=3, but GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK = 0 x 2 + 1 = 1"),
    ({"MASTER_ADDR": ""}, "MASTER_ADDR not set: a process started by torchrun has RANK, LOCAL_RANK"),
])
def test_a_bad_torchrun_variable_is_an_error_naming_it_and_its_value(change, message):
    with pytest.raises(InputError) as error:
        from_environment(dict(TORCHRUN, **change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# ---- a SLURM job step (srun) ----

def test_a_slurm_job_step_s_variables_become_fastreid_s_launch_arguments():
    run = from_environment(SLURM)
    # rank 0 runs on the first host of the node list; the port: 20000 + SLURM_JOB_ID mod 10000
    assert run == Launch(num_gpus=2, num_machines=2, machine_rank=1, dist_url="tcp://gpu017:23456", local_rank=1,
                         source="srun (SLURM_NTASKS=4, 2 tasks per node)")


def test_the_job_id_s_port_is_the_same_for_every_task_and_master_addr_and_port_override_it():
    tasks = [dict(SLURM, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2)) for r in range(4)]
    assert {from_environment(env).dist_url for env in tasks} == {"tcp://gpu017:23456"}
    assert from_environment(dict(SLURM, SLURM_JOB_ID="7")).dist_url == "tcp://gpu017:20007"
    assert from_environment(dict(SLURM, MASTER_PORT="29500", MASTER_ADDR="ib-gpu017")).dist_url == \
        "tcp://ib-gpu017:29500"
    assert from_environment(dict(SLURM, MASTER_ADDR="fd00::17")).dist_url == "tcp://[fd00::17]:23456"


def test_the_step_s_own_counts_and_nodes_come_before_the_job_s():
    step = dict(SLURM, SLURM_NTASKS="8", SLURM_TASKS_PER_NODE="4(x2)", SLURM_STEP_NUM_TASKS="4",
                SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="gpu[018-019]")
    assert from_environment(step) == Launch(2, 2, 1, "tcp://gpu018:23456", 1,
                                            "srun (SLURM_STEP_NUM_TASKS=4, 2 tasks per node)")
    assert from_environment(dict(SLURM, SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="3,1")).num_gpus == 2


def test_the_batch_script_itself_is_not_a_launched_process():
    # sbatch runs the script as task 0 of the job, without a step: train_net.py there is one process
    assert from_environment(without(SLURM, "SLURM_STEP_ID")) is None
    assert from_environment(dict(SLURM, SLURM_STEP_ID="batch")) is None
    assert from_environment(dict(SLURM, SLURM_STEP_ID="extern")) is None   # the job's extern step: not srun's
    assert from_environment(dict(SLURM, SLURM_STEP_ID="1")) is not None
    assert from_environment({}) is None


@pytest.mark.parametrize("change, message", [
    ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"},
     "SLURM_TASKS_PER_NODE=2,1: FastReID's launcher needs the same number of processes on every machine"),
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2, but SLURM_NODEID x SLURM_TASKS_PER_NODE + SLURM_LOCALID = 1 x 2 + 1 = 3"),
    ({"SLURM_TASKS_PER_NODE": "2(x)"}, "SLURM_TASKS_PER_NODE: not a SLURM task count list: '2(x)'"),
    ({"SLURM_JOB_NODELIST": "gpu[017-"}, "SLURM_JOB_NODELIST: not a SLURM host list: 'gpu[017-'"),
    ({"SLURM_NODEID": "x"}, "SLURM_NODEID='x' is not a whole number 0 or more"),
    ({"SLURM_JOB_ID": ""}, "MASTER_PORT or SLURM_JOB_ID not set in this SLURM job step"),
    ({"SLURM_JOB_NODELIST": ""}, "SLURM_STEP_NODELIST or SLURM_NODELIST or SLURM_JOB_NODELIST not set"),
])
def test_a_bad_slurm_variable_is_an_error_naming_it_and_its_value(change, message):
    with pytest.raises(InputError) as error:
        from_environment(dict(SLURM, **change))
    assert message in str(error.value)


@pytest.mark.parametrize("hostlist, hosts", [
    ("node07", ["node07"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[9-11],login", ["gpu9", "gpu10", "gpu11", "login"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2]b[3,5],c.example.org", ["a1b3", "a1b5", "a2b3", "a2b5", "c.example.org"]),
    ("[1-2]-ib", ["1-ib", "2-ib"]),
])
def test_slurm_host_lists_expand_in_order(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "node[01-", "node01]", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]"])
def test_a_malformed_host_list_is_refused(hostlist):
    with pytest.raises(ValueError, match="not a SLURM host list"):
        expand_hostlist(hostlist)


def test_slurm_task_counts_expand_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="not a SLURM task count list"):
        tasks_per_node("2(x3")


# ---- tools/train_net.py ----

@pytest.mark.parametrize("argv, env, fragments", [
    (["--num-gpus", "2"], dict(TORCHRUN, RANK="0", LOCAL_RANK="0", GROUP_RANK="0"),
     ["--num-gpus 2 conflicts with torchrun (WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)"]),
    ([], dict(SLURM, SLURM_NTASKS="four"), ["SLURM_NTASKS='four'"]),
])
def test_train_net_stops_with_one_line_naming_the_conflict_or_the_variable(argv, env, fragments):
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", PROMPTSG_CFG, *argv],
                            env=dict(clean, PYTHONWARNINGS="ignore", **env), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    one_line_error(result, *fragments)
