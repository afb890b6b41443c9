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
that holds a finished or interrupted run needs --resume or --overwrite.
"""
import json
import logging
import os
import sys

import promptsg  # noqa: F401  (patches FastReID for this stack, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer, default_argument_parser, default_setup
from fastreid.engine.hooks import PeriodicCheckpointer
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng
from fastreid.utils.logger import setup_logger
from promptsg import add_promptsg_config
from promptsg.data import describe_dataset
from promptsg.engine.checkpoint import (DiskFullError, NonFiniteError, PeriodicCheckpointerFinalOnce,
                                        SaveFinalBeforeEvaluation, check_space_to_resume, load_for_inference,
                                        resume_training_position, save_atomically)
from promptsg.engine.launcher import flags_not_given, launch, resolve_launch
from promptsg.modeling.diagnostics import AlignmentPrinter
from promptsg.engine.output_dir import OutputDirLock, check_new_run, remove_previous_run
from promptsg.engine.preflight import (InputError, check_config, check_datasets, check_output_dir, check_weights,
                                load_config)


class Trainer(DefaultTrainer):
    """FastReID's trainer; its log also shows the training accuracy and PromptSG's alignment, the
    final model is written before the final evaluation, and MODEL.WEIGHTS loads whole (its ID
    classifier left out only with MODEL.WEIGHTS_NEW_CLASSIFIER)."""

    def build_writers(self):
        return super().build_writers() + [AlignmentPrinter()]

    def build_hooks(self):
        self.write_failures = []              # final checkpoints a full disk refused (raised after the results)
        hooks = [PeriodicCheckpointerFinalOnce(h.checkpointer, h.period) if type(h) is PeriodicCheckpointer else h
                 for h in super().build_hooks()]
        return [SaveFinalBeforeEvaluation(self.checkpointer)] + hooks

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.skip_classifier = bool(self.cfg.MODEL.WEIGHTS_NEW_CLASSIFIER) and not resuming
        try:
            checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        finally:
            self.checkpointer.skip_classifier = False
        if resuming:
            self.start_epoch = checkpoint.get("epoch", -1) + 1
            if self.start_epoch < self.max_epoch:
                resume_training_position(self, checkpoint)


def setup(args):
    cfg = add_promptsg_config(get_cfg())
    load_config(cfg, args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)                  # seeds every RNG at random (FastReID has no SEED)
    logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="promptsg")
    if cfg.SEED >= 0:
        seed_all_rng(cfg.SEED + comm.get_rank())
        logger.info("SEED %d: RNGs seeded with %d", cfg.SEED, cfg.SEED + comm.get_rank())
    for name, variant in dataset_variants(cfg).items():
        logger.info("Dataset %s: %s", name, variant)
    return cfg


def dataset_variants(cfg):
    """Which variant of each train and test dataset the run reads (MSMT17_V1 or V2, CUHK03
    labeled or detected), for the log and results.json."""
    root = os.getenv("FASTREID_DATASETS", "datasets")
    names = dict.fromkeys(list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS))
    return {name: describe_dataset(name, root) for name in names}


def save_results(cfg, results, name):
    """Write the final metrics to OUTPUT_DIR/name (atomically) for scripts and comparisons."""
    if not (comm.is_main_process() and cfg.OUTPUT_DIR and results):
        return
    path = os.path.join(cfg.OUTPUT_DIR, name)
    text = json.dumps({**results, "datasets": dataset_variants(cfg)}, indent=2, default=float)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    save_atomically(path, write, len(text), "the results")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        cfg.defrost()
        cfg.MODEL.BACKBONE.PRETRAIN = False
        model = Trainer.build_model(cfg)
        load_for_inference(model, cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
        save_results(cfg, results, "eval_results.json")
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.resume and trainer.start_epoch >= trainer.max_epoch:
        logger = logging.getLogger("promptsg")
        done = os.path.join(cfg.OUTPUT_DIR, "results.json")
        logger.info("--resume: the run in %s is complete (%d of %d epochs); nothing to train. %s", cfg.OUTPUT_DIR,
                    trainer.start_epoch, trainer.max_epoch,
                    f"Its results: {done}" if os.path.isfile(done) else
                    "It has no results.json: evaluate it with --eval-only MODEL.WEIGHTS "
                    + os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        return {}
    results = trainer.train()
    save_results(cfg, results, "results.json")
    if trainer.write_failures:                # the results are written; now say what was not
        raise trainer.write_failures[0]
    return results


def preflight(args, run):
    """Fail on bad input in one line before any process is spawned or any model is built; returns
    the lock this run holds on its OUTPUT_DIR (machine 0's launcher, or global rank 0 under
    torchrun or srun, holds it for every process of the run)."""
    cfg = load_config(add_promptsg_config(get_cfg()), args.config_file, args.opts)
    check_config(cfg, processes=run.world_size)
    check_weights(cfg, args.eval_only)
    check_output_dir(cfg.OUTPUT_DIR)
    lock, previous = None, []
    if cfg.OUTPUT_DIR and run.holds_output_dir:
        lock = OutputDirLock(cfg.OUTPUT_DIR).acquire()
    try:
        if lock is not None and not args.eval_only:
            previous = check_new_run(cfg.OUTPUT_DIR, args.resume, args.overwrite)
            if args.resume:
                check_space_to_resume(cfg.OUTPUT_DIR)
        # one process per machine decodes the images
        check_datasets(cfg, os.getenv("FASTREID_DATASETS", "datasets"), verify_images=run.local_rank in (None, 0))
    except BaseException:
        if lock is not None:       # a refused start leaves the lock as it found it: no holder described
            lock.release()
        raise
    remove_previous_run(cfg.OUTPUT_DIR, previous)   # only once every check has passed
    return lock


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--overwrite", action="store_true",
                        help="train over the run already in OUTPUT_DIR (its checkpoints and results are removed)")
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args(namespace=flags_not_given())
    lock = None
    try:
        run = resolve_launch(args, parser)    # the flags, or torchrun's / srun's variables
        lock = preflight(args, run)
        launch(main, run, args=(args,))
    except (InputError, NonFiniteError, DiskFullError) as exc:  # bad input, foreign checkpoint, NaN, full disk
        sys.exit(f"error: {exc.strerror if isinstance(exc, DiskFullError) else exc}")
    finally:
        if lock is not None:
            lock.release()
