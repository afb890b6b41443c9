"""The project's trainer: FastReID's ``DefaultTrainer`` extended at its own extension points, as
FastReID's projects extend it (FastRetri's ``Trainer``), and the run that ``tools/train_net.py``
starts with it.

``Trainer`` is what every run trains and evaluates with, PromptSG's and FastReID's baselines
alike, so comparisons stay like for like; ``promptsg.load`` and the tools evaluate with its
``build_evaluator`` and load with ``checkpoint.load_for_inference``:

    build_evaluator   ``evaluation.ChunkedReidEvaluator``: ranking in query chunks, non-finite
                      features refused, the queries the protocol skipped counted
    build_optimizer   FastReID's optimizer over the real parameters, in merged parameter groups,
                      fused with SOLVER.FUSED (``solver``)
    build_hooks       ``checkpoint.AtomicCheckpointer`` (whole loads, atomic saves, RNG states),
                      ``model_final`` written once and before the final evaluation; the
                      evaluations timed apart from the training (``timing``)
    train             for CLIP-ReID, its stage 1 first (``prompt_stage.prepare_identity_prompts``)
    build_writers     the training accuracy and PromptSG's alignment in the log
                      (``modeling.diagnostics.AlignmentPrinter``)
    resume_or_load    ``--resume`` continues the sampler and the RNG streams where the run stopped;
                      MODEL.WEIGHTS loads whole (its ID classifier left out only with
                      MODEL.WEIGHTS_NEW_CLASSIFIER)

``preflight`` (before any process starts), then in each process ``train_and_evaluate`` (``setup``,
then this trainer) are the steps of ``tools/train_net.py``.
"""
import json
import logging
import os
import time

from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer, default_setup
from fastreid.engine.hooks import EvalHook, PeriodicCheckpointer
from fastreid.solver.build import build_optimizer
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng
from fastreid.utils.logger import setup_logger

from ..config import add_promptsg_config
from ..data.real_datasets import describe_dataset
from ..modeling.diagnostics import AlignmentPrinter
from .checkpoint import (AtomicCheckpointer, PeriodicCheckpointerFinalOnce, SaveFinalBeforeEvaluation,
                         check_space_to_resume, load_for_inference, resume_training_position, save_atomically)
from .evaluation import ChunkedReidEvaluator
from .output_dir import OutputDirLock, check_new_run, remove_previous_run
from .preflight import check_config, check_datasets, check_output_dir, check_weights, load_config
from .prompt_stage import prepare_identity_prompts
from .solver import with_fused_kernels, with_merged_groups

logger = logging.getLogger("promptsg")


class Trainer(DefaultTrainer):
    """FastReID's ``DefaultTrainer`` with the project's evaluator, optimizer, checkpointer, hooks
    and log (the module docstring lists what each override adds).

    ``timing``: this invocation's seconds of ``train_seconds`` (the training steps and their
    hooks, the evaluations and CLIP-ReID's stage 1 not counted), ``evaluation_seconds`` and, where
    it ran, ``stage1_seconds``; written into results.json.
    """

    def __init__(self, cfg):
        self.timing = {"train_seconds": 0.0, "evaluation_seconds": 0.0}
        self.resuming = self.resumed = False    # --resume asked for; a checkpoint was resumed
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None):
        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        return data_loader, ChunkedReidEvaluator(cfg, num_query, output_dir)

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer, params = build_optimizer(cfg, model, contiguous=False)
        optimizer = with_merged_groups(optimizer)
        if cfg.SOLVER.get("FUSED", False):
            optimizer = with_fused_kernels(optimizer)
        return optimizer, params

    def build_writers(self):
        return super().build_writers() + [AlignmentPrinter()]

    def build_hooks(self):
        # DefaultTrainer.__init__ builds FastReID's Checkpointer inline and then calls this method:
        # the first point at which the trainer's checkpointer can be the project's.
        self.checkpointer = AtomicCheckpointer.replacing(self.checkpointer)
        self.write_failures = []              # final checkpoints a full disk refused (raised after the results)
        replace = {PeriodicCheckpointer: lambda h: PeriodicCheckpointerFinalOnce(self.checkpointer, h.period),
                   EvalHook: lambda h: EvalHook(self.cfg.TEST.EVAL_PERIOD, self.timed_test)}
        hooks = [replace[type(h)](h) if type(h) in replace else h for h in super().build_hooks()]
        return [SaveFinalBeforeEvaluation(self.checkpointer)] + hooks

    def timed_test(self):
        """FastReID's periodic and final evaluation (its EvalHook's function), timed."""
        start = time.perf_counter()
        self._last_eval_results = self.test(self.cfg, self.model)
        self.timing["evaluation_seconds"] += time.perf_counter() - start
        return self._last_eval_results

    def train(self):
        start = time.perf_counter()
        try:
            if self.cfg.MODEL.META_ARCHITECTURE == "CLIPReID":
                prepare_identity_prompts(self)          # CLIP-ReID's stage 1, before stage 2's loop
            return super().train()
        finally:
            self.timing["train_seconds"] = (time.perf_counter() - start - self.timing["evaluation_seconds"]
                                            - self.timing.get("stage1_seconds", 0.0))

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        self.resuming, self.resumed = resume, resuming
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
    """The run's frozen config, FastReID's set-up (log, config.yaml), the RNGs seeded by SEED."""
    cfg = add_promptsg_config(get_cfg())
    load_config(cfg, args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)                  # seeds every RNG at random (FastReID has no SEED)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="promptsg")
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


def save_results(cfg, results, name, timing=None):
    """Write the final metrics to OUTPUT_DIR/name (atomically) for scripts and comparisons, with
    the datasets' variants and the trainer's ``timing`` (seconds) where given."""
    if not (comm.is_main_process() and cfg.OUTPUT_DIR and results):
        return
    path = os.path.join(cfg.OUTPUT_DIR, name)
    extra = {"datasets": dataset_variants(cfg), **({"timing": timing} if timing else {})}
    text = json.dumps({**results, **extra}, indent=2, default=float)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    save_atomically(path, write, len(text), "the results")


def train_and_evaluate(args):
    """One process of the run: evaluate MODEL.WEIGHTS (``--eval-only``), or train (from the last
    checkpoint with ``--resume``) and evaluate; the metrics go to eval_results.json / results.json."""
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
        done = os.path.join(cfg.OUTPUT_DIR, "results.json")
        logger.info("--resume: the run in %s is complete (%d of %d epochs); nothing to train. %s", cfg.OUTPUT_DIR,
                    trainer.start_epoch, trainer.max_epoch,
                    f"Its results: {done}" if os.path.isfile(done) else
                    "It has no results.json: evaluate it with --eval-only MODEL.WEIGHTS "
                    + os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        return {}
    results = trainer.train()
    save_results(cfg, results, "results.json", trainer.timing)
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
