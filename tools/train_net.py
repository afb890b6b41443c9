#!/usr/bin/env python
"""FastReID's training / evaluation entry point, with PromptSG registered.

The same command trains a FastReID baseline config (configs/) or a PromptSG config
(projects/PromptSG/configs/):

    python tools/train_net.py --config-file projects/PromptSG/configs/Market1501/vit.yml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --num-gpus 2       # two processes (gloo on CPU)
    torchrun --nproc-per-node 2 tools/train_net.py --config-file CFG   # the same, started by torchrun
    srun --ntasks-per-node 2 python tools/train_net.py --config-file CFG   # or by a SLURM job step
    python tools/train_net.py --config-file CFG --resume           # continue the run in OUTPUT_DIR
    python tools/train_net.py --config-file CFG --overwrite        # replace the run in OUTPUT_DIR

A run holds its OUTPUT_DIR: a second run into it stops at start-up, and a new run into a folder
that holds a finished or interrupted run needs --resume or --overwrite. Every run trains and
evaluates with the project's ``Trainer`` (``promptsg/engine/trainer.py``: FastReID's
``DefaultTrainer`` with the project's evaluator, optimizer, checkpointer, hooks and log).
"""
import sys

import promptsg  # noqa: F401  (mends FastReID for this stack, registers PromptSG)
from fastreid.engine import default_argument_parser
from promptsg.engine.checkpoint import DiskFullError, NonFiniteError
from promptsg.engine.launcher import flags_not_given, launch, resolve_launch
from promptsg.engine.preflight import InputError
from promptsg.engine.trainer import preflight, train_and_evaluate


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--overwrite", action="store_true",
                        help="train over the run already in OUTPUT_DIR (its checkpoints and results are removed)")
    return parser


def main(argv=None):
    """Check the input (``preflight``), then start the run's processes (``launch``), each of which
    sets up the run and trains and evaluates it with the project's ``Trainer``."""
    parser = argument_parser()
    args = parser.parse_args(argv, namespace=flags_not_given())
    lock = None
    try:
        launched = resolve_launch(args, parser)    # the flags, or torchrun's / srun's variables
        lock = preflight(args, launched)
        launch(train_and_evaluate, launched, args=(args,))
    except (InputError, NonFiniteError, DiskFullError) as exc:  # bad input, foreign checkpoint, NaN, full disk
        sys.exit(f"error: {exc.strerror if isinstance(exc, DiskFullError) else exc}")
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main()
