"""Speed and memory of PromptSG against the CLIP visual-only baseline (the same tower, the same
batch), both models in one process, timed in interleaved rounds (tools/perf/benchmark.py).

The baseline is the given config with the visual-only overrides of
configs/Market1501/clip_baseline.yml (``BASELINE_OVERRIDES``). Training steps run as
promptsg.engine.compat's AMPTrainer trains (bf16 autocast when SOLVER.AMP.ENABLED and CUDA supports
it, fp16 with a GradScaler otherwise); inference runs in eval mode under torch.inference_mode.
``run_data_wait`` instead trains on FastReID's real train loader and measures the share of step
time spent waiting on it.
"""
import json
import statistics
import time
from contextlib import nullcontext

import torch

from fastreid.config import get_cfg

from fastreid.modeling import build_model
from fastreid.utils.events import EventStorage

from ..config import add_promptsg_config
from ..engine.preflight import InputError, load_config
from .peak_memory import PeakMemory
from ..engine.trainer import Trainer
from ..utils import records

# The CLIP baseline of configs/Market1501/clip_baseline.yml: ID + triplet losses, no prompt, no MIM.
BASELINE_OVERRIDES = [
    "MODEL.LOSSES.NAME", '("CrossEntropyLoss", "TripletLoss")',
    "MODEL.PROMPTSG.COMPOSE_TRAIN", "False",
    "MODEL.PROMPTSG.MIM.CROSS_LAYERS", "0",
    "MODEL.PROMPTSG.MIM.SELF_LAYERS", "0",
    "MODEL.PROMPTSG.INFERENCE_PROMPT", "simplified",
    "MODEL.LOSSES.SUPCON.MAP_SCALE", "0.0",      # no map to pool without a MIM (ablations/map_pool.yml)
]
# What the PromptSG model must reach against the baseline (higher is better for "min").
TARGETS = {
    "inference_simplified_vs_visual": ("min", 0.95),
    "inference_composed_vs_visual": ("min", 0.80),
    "train_step_time_vs_baseline": ("max", 1.25),
}
DEFAULT_NUM_CLASSES = 751  # Market-1501's training identities, when the config leaves it at 0


def setup_cfg(config_file, opts, device, batch=None, test_batch=None, extra_opts=()):
    """The config of ``config_file`` with ``opts`` then ``extra_opts``, on ``device``, with the
    training and inference batches given (else the config's)."""
    cfg = add_promptsg_config(get_cfg())
    load_config(cfg, config_file, list(opts) + list(extra_opts))
    cfg.MODEL.DEVICE = device
    if batch:
        cfg.SOLVER.IMS_PER_BATCH = batch
    if test_batch:
        cfg.TEST.IMS_PER_BATCH = test_batch
    if cfg.SOLVER.IMS_PER_BATCH % cfg.DATALOADER.NUM_INSTANCE:
        raise InputError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not a multiple of "
                         f"DATALOADER.NUM_INSTANCE {cfg.DATALOADER.NUM_INSTANCE}")
    return cfg


def amp_dtype(cfg, device):
    """The autocast dtype of promptsg.engine.compat's AMPTrainer, or None (float32)."""
    if not cfg.SOLVER.AMP.ENABLED or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype):
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One model with its optimizer and the closures that run one training / inference step."""

    def __init__(self, name, cfg, device):
        self.name, self.cfg, self.device = name, cfg, device
        self.dtype = amp_dtype(cfg, device)
        torch.manual_seed(0)
        start = time.perf_counter()
        self.model = build_model(cfg)
        self.build_s = time.perf_counter() - start
        self.optimizer, _ = Trainer.build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.prompt_modes = self._prompt_modes()

    def _prompt_modes(self):
        """Inference prompts this model can run: none for the visual-only model."""
        model = self.model
        if model.text is None or model.heads.mim is None and model.heads.inversion is None:
            return ["visual"]
        return ["simplified", "composed"] if model.heads.inversion is not None else ["simplified"]

    def train_batch(self, batch_size):
        ids = batch_size // self.cfg.DATALOADER.NUM_INSTANCE
        targets = torch.arange(ids).repeat_interleave(self.cfg.DATALOADER.NUM_INSTANCE)
        return self._images(batch_size, self.cfg.INPUT.SIZE_TRAIN, targets.to(self.device))

    def test_batch(self, batch_size):
        return self._images(batch_size, self.cfg.INPUT.SIZE_TEST)

    def _images(self, batch_size, size, targets=None):
        generator = torch.Generator(device=self.device).manual_seed(1)
        images = torch.rand(batch_size, 3, *size, device=self.device, generator=generator) * 255
        batch = {"images": images, "camids": torch.zeros(batch_size, dtype=torch.long, device=self.device)}
        if targets is not None:
            batch["targets"] = targets
        return batch

    def train_step(self, batch):
        self.model.train()
        with autocast(self.device, self.dtype):
            loss_dict = self.model(batch)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses

    def infer(self, batch, prompt):
        self.model.eval()
        if prompt != "visual":
            self.model.inference_prompt = prompt
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(batch)

    def state_bytes(self):
        """Parameters, gradients of the trainable ones, and optimizer state, in bytes."""
        params = list(self.model.parameters())
        total = sum(p.numel() * p.element_size() for p in params)
        total += sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return total

    def num_params(self):
        params = list(self.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def timed(fn, iters, device):
    """Seconds per call of ``fn`` over ``iters`` calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


class Recorder:
    """Prints each measurement as one JSON line and keeps it (and writes it to ``--out``)."""

    def __init__(self, path=None, tag=None):
        self.records = []
        self.tag = tag
        self.file = open(path, "w") if path else None

    def __call__(self, **record):
        if self.tag is not None:
            record = {"tag": self.tag, **record}
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.records.append(record)
        return record

    def close(self):
        if self.file:
            self.file.close()


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but CUDA is not available")
    return torch.device(name)


def environment(device):
    """The device, the machine (``utils.records.machine``) and the Python version of a measurement."""
    machine = records.machine()
    info = {"device": str(device), "torch": machine["torch"], "threads": machine["torch_threads"],
            "python": machine["python"]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"], info["cpu_count"] = machine["cpu"], machine["cpus"]
    return info


def run_benchmark(args, record):
    """Both models built, warmed up, their memory measured, then timed in interleaved rounds;
    ``args``: tools/perf/benchmark.py's arguments, ``record``: a Recorder. Prints the table."""
    device = resolve_device(args.device)
    cfg = setup_cfg(args.config_file, args.opts, device.type, args.batch, args.test_batch)
    if cfg.MODEL.HEADS.NUM_CLASSES == 0:
        cfg.MODEL.HEADS.NUM_CLASSES = DEFAULT_NUM_CLASSES
    base_cfg = setup_cfg(args.config_file, args.opts, device.type, args.batch, args.test_batch, BASELINE_OVERRIDES)
    base_cfg.MODEL.HEADS.NUM_CLASSES = cfg.MODEL.HEADS.NUM_CLASSES
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK

    variants = [Variant("baseline", base_cfg, device), Variant("promptsg", cfg, device)]
    train_bs, test_bs = cfg.SOLVER.IMS_PER_BATCH, cfg.TEST.IMS_PER_BATCH
    dtype = variants[1].dtype
    record(kind="setup", config=args.config_file, opts=list(args.opts), baseline_overrides=BASELINE_OVERRIDES,
           clip=cfg.MODEL.CLIP.NAME,
           image_size=list(cfg.INPUT.SIZE_TRAIN), train_batch=train_bs,
           identities=train_bs // cfg.DATALOADER.NUM_INSTANCE, test_batch=test_bs,
           num_classes=cfg.MODEL.HEADS.NUM_CLASSES,
           dtype=dtype_name(dtype),
           iters=args.iters, warmup=args.warmup, rounds=args.rounds, **environment(device),
           models={v.name: {"params": v.num_params()[0], "trainable": v.num_params()[1],
                            "build_s": round(v.build_s, 2), "prompts": v.prompt_modes} for v in variants})

    # (variant, phase) units; phase "train" or an inference prompt mode.
    units = [] if args.inference_only else [(v, "train") for v in variants]
    if not args.train_only:
        units += [(v, mode) for v in variants for mode in v.prompt_modes]
    batches = {v.name: (v.train_batch(train_bs), v.test_batch(test_bs)) for v in variants}

    def step_fn(variant, phase):
        train, test = batches[variant.name]
        if phase == "train":
            return lambda: variant.train_step(train)
        return lambda: variant.infer(test, phase)

    with EventStorage(0):
        for v, phase in units:                   # warm-up, then the memory of one more step
            fn = step_fn(v, phase)
            for _ in range(args.warmup):
                fn()
            with PeakMemory(device) as mem:
                fn()
            record(kind="memory", variant=v.name, phase=phase, peak_step_bytes=mem.bytes,
                   state_bytes=v.state_bytes(), method=mem.method, exact=mem.exact)

        # Steps of all units alternate one by one (A B C, C B A, ...) so that a burst of load on
        # a shared machine falls on every unit alike.
        times = {(v.name, phase): [] for v, phase in units}
        fns = {(v.name, phase): step_fn(v, phase) for v, phase in units}
        for r in range(args.rounds):
            per_round = {key: [] for key in times}
            for i in range(args.iters):
                for key in (fns if (r * args.iters + i) % 2 == 0 else list(fns)[::-1]):
                    per_round[key].append(timed(fns[key], 1, device))
            for (name, phase), seconds in per_round.items():
                times[(name, phase)] += seconds
                bs = train_bs if phase == "train" else test_bs
                step_s = statistics.median(seconds)
                record(kind="train" if phase == "train" else "inference", variant=name,
                       prompt=None if phase == "train" else phase, round=r, batch=bs,
                       iters=args.iters, step_s=step_s, step_s_min=min(seconds), images_per_s=bs / step_s)

    if cfg.MODEL.PROMPTSG.COMPILE:
        record(kind="compile", mode=cfg.MODEL.PROMPTSG.COMPILE, **compile_counters())
    median = {key: statistics.median(values) for key, values in times.items()}
    fastest = {key: min(values) for key, values in times.items()}
    summary = {}
    for (name, phase), seconds in median.items():
        bs = train_bs if phase == "train" else test_bs
        key = "train" if phase == "train" else f"inference_{phase}"
        summary.setdefault(name, {})[f"{key}_step_s"] = seconds
        summary[name][f"{key}_step_s_min"] = fastest[(name, phase)]
        summary[name][f"{key}_images_per_s"] = bs / seconds
    record(kind="summary", median=summary, steps_per_unit=args.rounds * args.iters)

    ratios = speed_ratios(median)
    met = {k: (v >= TARGETS[k][1] if TARGETS[k][0] == "min" else v <= TARGETS[k][1])
           for k, v in ratios.items() if v is not None}
    final = record(kind="ratios", **ratios, from_fastest_steps=speed_ratios(fastest),
                   targets={k: f"{'>=' if s == 'min' else '<='} {t}" for k, (s, t) in TARGETS.items()},
                   meets_targets=met)
    memory = [r for r in record.records if r["kind"] == "memory"]
    print(format_table(summary, memory, final, device, dtype, train_bs, test_bs))
    return record.records


def compile_counters():
    """torch.compile's bookkeeping: graphs, graph breaks (with reasons) and recompilations."""
    from torch._dynamo.utils import counters

    return {"stats": dict(counters["stats"]), "graph_breaks": dict(counters["graph_break"]),
            "recompiles": dict(counters["recompiles"]) if "recompiles" in counters else {},
            "inductor": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "fxgraph" in k}}


def speed_ratios(seconds):
    """PromptSG against the baseline from per-step seconds keyed by (variant, phase)."""
    visual = seconds.get(("baseline", "visual"))      # None with --train-only

    def throughput_ratio(mode):
        return visual / seconds[("promptsg", mode)] if visual and ("promptsg", mode) in seconds else None

    return {
        "inference_simplified_vs_visual": throughput_ratio("simplified"),
        "inference_composed_vs_visual": throughput_ratio("composed"),
        "train_step_time_vs_baseline": (seconds[("promptsg", "train")] / seconds[("baseline", "train")]
                                        if ("baseline", "train") in seconds else None),
    }


def format_table(summary, memory, ratios, device, dtype, train_bs, test_bs):
    """The medians, memory and ratios as a plain-text table."""
    mib = 2 ** 20
    peak = {(m["variant"], m["phase"]): m["peak_step_bytes"] / mib for m in memory}
    state = {m["variant"]: m["state_bytes"] / mib for m in memory}
    rows = [("", "train step s", "train img/s", "infer img/s", "composed img/s",
             "state MiB", "train peak MiB", "infer peak MiB")]
    for name, label, mode in (("baseline", "CLIP visual-only", "visual"), ("promptsg", "PromptSG", "simplified")):
        s = summary[name]
        infer = s.get(f"inference_{mode}_images_per_s")
        composed = s.get("inference_composed_images_per_s")
        trained = "train_step_s" in s
        rows.append((label, f"{s['train_step_s']:.4f}" if trained else "-",
                     f"{s['train_images_per_s']:.1f}" if trained else "-",
                     f"{infer:.1f}" if infer else "-",
                     f"{composed:.1f}" if composed else "-", f"{state[name]:.0f}",
                     f"+{peak[(name, 'train')]:.0f}" if trained else "-",
                     f"+{peak[(name, mode)]:.0f}" if infer else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"device {device}, {dtype_name(dtype)}, "
             f"train batch {train_bs}, inference batch {test_bs} (medians over rounds)"]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines.append("PromptSG / baseline: from the medians; from the fastest steps")
    for key in TARGETS:
        value, fastest = ratios[key], ratios["from_fastest_steps"][key]
        if value is not None:
            ok = ratios["meets_targets"][key]
            lines.append(f"{key:32s} {value:6.3f}; {fastest:6.3f}   target {ratios['targets'][key]:7s} "
                         f"{'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def run_data_wait(args, record):
    """Train on the real train loader; share of step time spent in next(loader)."""
    device = resolve_device(args.device)
    cfg = setup_cfg(args.config_file, args.opts, device.type, args.batch, args.test_batch)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    loader = Trainer.build_train_loader(cfg)
    if cfg.MODEL.HEADS.NUM_CLASSES == 0:
        cfg.MODEL.HEADS.NUM_CLASSES = loader.dataset.num_classes
    variant = Variant("promptsg", cfg, device)
    waits, steps = [], []
    data = iter(loader)
    with EventStorage(0):
        for i in range(args.warmup + args.data_wait):
            start = time.perf_counter()
            batch = next(data)
            waited = time.perf_counter() - start
            variant.train_step(batch).item()      # the trainer's metric logging syncs here too
            if i >= args.warmup:
                waits.append(waited)
                steps.append(time.perf_counter() - start)
    bs = cfg.SOLVER.IMS_PER_BATCH
    return record(kind="data_wait", config=args.config_file, opts=list(args.opts), clip=cfg.MODEL.CLIP.NAME,
                  image_size=list(cfg.INPUT.SIZE_TRAIN), dtype=dtype_name(variant.dtype),
                  datasets=list(cfg.DATASETS.NAMES), num_workers=cfg.DATALOADER.NUM_WORKERS,
                  batch=bs, steps=len(steps), warmup=args.warmup, wait_share=sum(waits) / sum(steps),
                  wait_s_median=statistics.median(waits), wait_s_max=max(waits),
                  step_s_median=statistics.median(steps), images_per_s=bs * len(steps) / sum(steps),
                  **environment(device))
