"""PromptSG's fast paths give the numbers of the plain computation, inside the whole model.

Each shortcut (cached simplified prompt, prompt-length text encoding, one-row last MIM block,
key/value projections folded into the MIM's one-query attention, bf16 autocast, no host-device
synchronisation) is checked through ``build_model`` against a computation written here:
open_clip's own 77-token text path, or open_clip's full MIM blocks.
tools/perf/benchmark.py, which measures what these shortcuts buy, is run once on a tiny model.
"""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import promptsg.modeling.interaction
from promptsg.modeling.interaction import FUSIONS, MAP_FUSIONS
from fastreid.engine.train_loop import SimpleTrainer
from fastreid.evaluation import DatasetEvaluator, inference_on_dataset
from fastreid.modeling import build_model
from fastreid.utils.events import EventStorage
from promptsg.engine.trainer import Trainer
from promptsg.modeling.clip_weights import create_clip_model
from test_promptsg_model import PROMPT, SIMPLE, batch, tiny_cfg
from tiny_runs import load_tool

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")


def reference_clip(model):
    """A separate open_clip CLIP carrying ``model``'s text-tower weights."""
    clip = create_clip_model("tiny-ViT", "", (64, 32))
    missing, unexpected = clip.load_state_dict(model.text.state_dict(), strict=False)
    text_keys = ("transformer.", "ln_final", "token_embedding", "positional_embedding", "text_projection")
    assert not unexpected and not any(k.startswith(text_keys) for k in missing)
    return clip.to(model.device).eval()


def encode_full_context(clip, prompt, pseudo_tokens=None, index=5):
    """open_clip's text path over the full 77-token context, s* written in at ``index``.

    token embeddings (B, 77, D) + positional embedding -> transformer with CLIP's causal mask
    ``attn_mask`` -> ln_final -> the EOT token (argmax of the ids) -> text projection.
    """
    ids = open_clip.get_tokenizer("tiny-ViT")([prompt]).to(clip.positional_embedding.device)  # (1, 77)
    x = clip.token_embedding(ids)
    if pseudo_tokens is not None:
        x = x.expand(len(pseudo_tokens), -1, -1).clone()
        x[:, index] = pseudo_tokens
    x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[:, int(ids[0].argmax())] @ clip.text_projection                                  # (B, E)


def forward(model, inputs):
    with EventStorage(0):
        return model(inputs)


def on(device, inputs):
    return {k: v.to(device) for k, v in inputs.items()}


# ---- the simplified prompt ----

def test_simplified_prompt_is_encoded_once_per_model_and_equals_encode_text():
    model = build_model(tiny_cfg()).eval()
    runs, queries = [], []
    model.text.transformer.register_forward_hook(lambda *a: runs.append(1))
    model.heads.mim.register_forward_pre_hook(lambda m, args: queries.append(args[0]))
    counts = []
    with torch.no_grad():
        for n_ids in (4, 2, 4):                  # several eval batches, two batch sizes
            model(batch(n_ids=n_ids))
            counts.append(len(runs))
        reference = reference_clip(model).encode_text(open_clip.get_tokenizer("tiny-ViT")([SIMPLE]))
    assert counts == [1, 1, 1]
    for query in queries:
        torch.testing.assert_close(query[:, 0], reference.expand(len(query), -1), rtol=1e-5, atol=1e-5)


# ---- the composed prompt: only its 9 real tokens go through the text encoder ----

def spy_on_compose(model, monkeypatch):
    """Record the s* that reach PromptComposer.compose and the text embedding it returns."""
    seen = {}
    compose = model.text.compose

    def spy(pseudo_tokens, return_tokens=False, words=""):
        seen["s_star"], seen["text"] = pseudo_tokens, compose(pseudo_tokens, return_tokens, words)
        return seen["text"]

    monkeypatch.setattr(model.text, "compose", spy)
    lengths = []
    model.text.transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    return seen, lengths, compose


def test_composed_inference_encodes_nine_tokens_equal_to_the_full_context(monkeypatch):
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.INFERENCE_PROMPT": "composed"})).eval()
    seen, lengths, _ = spy_on_compose(model, monkeypatch)
    with torch.no_grad():
        model(batch())
        reference = encode_full_context(reference_clip(model), PROMPT, seen["s_star"])
    assert lengths == [9]                        # [SOS, a, photo, of, a, s*, person, ., EOT]
    torch.testing.assert_close(seen["text"], reference, rtol=1e-5, atol=1e-5)


def test_composed_training_encodes_nine_tokens_with_the_full_context_gradient(monkeypatch):
    model = build_model(tiny_cfg()).train()
    seen, lengths, compose = spy_on_compose(model, monkeypatch)
    forward(model, batch())
    assert lengths == [9]
    clip = reference_clip(model)
    s_fast = seen["s_star"].detach().clone().requires_grad_()
    s_full = seen["s_star"].detach().clone().requires_grad_()
    fast, full = compose(s_fast), encode_full_context(clip, PROMPT, s_full)
    torch.testing.assert_close(seen["text"].detach(), full.detach(), rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(full)
    (fast * cotangent).sum().backward()
    (full * cotangent).sum().backward()
    torch.testing.assert_close(s_fast.grad, s_full.grad, rtol=1e-3, atol=1e-5)   # float32 rounding of 9 vs 77 tokens


# ---- the MIM computes only the last block's query row, and never projects keys and values ----

def row_bias_mask(block, x, index, key_bias):
    """open_clip's ``attn_mask`` (B * H, N, N) adding ``key_bias`` (B, N) to row ``index``'s logits only."""
    batch, n = x.shape[:2]
    mask = x.new_zeros(batch, n, n)
    mask[:, index] = key_bias
    return mask.repeat_interleave(block.attn.num_heads, dim=0)


def full_block_row(block, x, index, key_bias=None):
    """The reference for query_row_forward: open_clip's whole block, the bias given to row ``index``
    through its attention mask, then the row."""
    mask = None if key_bias is None else row_bias_mask(block, x, index, key_bias)
    return block(x, attn_mask=mask)[:, index]


def full_read_block(block, x, read_bias):
    """The reference for block_forward: open_clip's whole block, every row's keys and values
    projected, with ``read_bias`` on row 0's logits through its attention mask."""
    return block(x, attn_mask=row_bias_mask(block, x, 0, read_bias))


def full_cross_block(block, query, patches):
    """The reference for cross_block_forward: open_clip's attention, keys and values projected,
    with no residual from the query (Eq. 7), then the block's MLP residual."""
    kv = block.ln_1_kv(patches)
    x = block.ls_1(block.attention(block.ln_1(query), k_x=kv, v_x=kv))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


MIM_FAST_PATHS = {"query_row_forward": full_block_row, "cross_block_forward": full_cross_block,
                  "block_forward": full_read_block}
# Every fusion with each fast path it runs: the map fusions bias v's row in every block and have no
# cross block; "attention" has no bias.
FUSION_FAST_PATHS = [(fusion, path) for fusion in FUSIONS for path in MIM_FAST_PATHS
                     if path == "query_row_forward" or (path == "block_forward") == (fusion in MAP_FUSIONS)]


@pytest.mark.parametrize("fusion, fast_path", FUSION_FAST_PATHS)
@pytest.mark.parametrize("query", ["pooled", "tokens"])
@pytest.mark.parametrize("prompt", ["simplified", "composed"])
def test_head_feature_with_mim_fast_path_equals_the_full_blocks(monkeypatch, prompt, query, fast_path, fusion):
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.INFERENCE_PROMPT": prompt, "MODEL.PROMPTSG.MIM.QUERY": query,
                                    "MODEL.PROMPTSG.MIM.FUSION": fusion})).eval()
    rows = []
    model.heads.mim.blocks[-1].mlp.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    with torch.no_grad():
        fast = model(batch())
        monkeypatch.setattr(promptsg.modeling.interaction, fast_path, MIM_FAST_PATHS[fast_path])
        full = model(batch())
    assert rows[0] == 1                          # the fast path runs the last MLP on one token
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion, fast_path", FUSION_FAST_PATHS)
def test_training_losses_and_gradients_with_mim_fast_path_equal_the_full_blocks(monkeypatch, fast_path, fusion):
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.MIM.FUSION": fusion})).train()

    def losses_and_grads():
        model.zero_grad(set_to_none=True)
        losses = forward(model, batch())
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in losses.items()}, grads

    fast_losses, fast_grads = losses_and_grads()
    monkeypatch.setattr(promptsg.modeling.interaction, fast_path, MIM_FAST_PATHS[fast_path])
    full_losses, full_grads = losses_and_grads()
    torch.testing.assert_close(fast_losses, full_losses, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys()
    assert any(k.startswith("heads.mim.blocks.0.attn") for k in fast_grads)
    assert any(k.startswith("heads.mim.cross") and ("in_proj" in k or "q_proj" in k) for k in fast_grads)
    torch.testing.assert_close(fast_grads, full_grads, rtol=1e-4, atol=1e-5)


def test_mim_fast_paths_under_bf16_autocast_are_as_close_to_float32_as_the_full_blocks(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    for blk in [*model.heads.mim.cross, *model.heads.mim.blocks]:   # PyTorch starts the biases at zero
        torch.nn.init.normal_(blk.q_proj.bias if hasattr(blk, "q_proj") else blk.attn.in_proj_bias, std=0.5)
    inputs = batch()
    with torch.no_grad():
        exact = model(inputs)
        with torch.autocast("cpu", torch.bfloat16):
            fast = model(inputs).float()
            for name, reference in MIM_FAST_PATHS.items():
                monkeypatch.setattr(promptsg.modeling.interaction, name, reference)
            full = model(inputs).float()
    fast_error, full_error = (fast - exact).abs().max(), (full - exact).abs().max()
    assert 0 < full_error < 0.05 * exact.abs().max()              # bf16 rounding, nothing worse
    assert fast_error <= 1.5 * full_error


# ---- CUDA: bf16 autocast and no host-device synchronisation ----

@needs_cuda
def test_cuda_bf16_autocast_training_step_gives_finite_losses_and_updates_weights():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = tiny_cfg(**{"MODEL.DEVICE": "cuda"})
    model = build_model(cfg).train()
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    tracked = {"backbone": model.backbone.visual.conv1.weight, "mim": model.heads.mim.blocks[0].attn.in_proj_weight,
               "map": model.heads.mim.cross[0].q_proj.weight,
               "inversion": model.heads.inversion.mlp[0].weight, "classifier": model.heads.classifier.weight}
    before = {k: p.detach().clone() for k, p in tracked.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = forward(model, on("cuda", batch()))
    assert all(torch.isfinite(v).item() for v in losses.values()), losses
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    for name, p in tracked.items():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} weights did not change"


def train_and_infer(model, inputs, amp=False):
    """One training forward + backward (PromptSG's real losses) and both inference prompts."""
    model.train()
    with torch.autocast(inputs["images"].device.type, dtype=torch.bfloat16, enabled=amp):
        losses = forward(model, inputs)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast(inputs["images"].device.type, dtype=torch.bfloat16, enabled=amp):
        for mode in ("simplified", "composed"):
            model.inference_prompt = mode
            model(inputs)


def composed_model(device):
    return build_model(tiny_cfg(**{"MODEL.DEVICE": device, "MODEL.PROMPTSG.INFERENCE_PROMPT": "composed"}))


class RecordedScalars:
    """Stands in for PromptSG's DeferredScalars: keeps what would be logged."""

    def __init__(self):
        self.values = []

    def put(self, values):
        self.values.append(values)


class HostReads(TorchDispatchMode):
    """Records the ATen ops that copy a tensor's values to the host (a synchronisation on CUDA)."""

    OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero,
           torch.ops.aten.equal, torch.ops.aten.masked_select, torch.ops.aten._unique2,
           torch.ops.aten.unique_consecutive, torch.ops.aten.unique_dim}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_forward_and_backward_read_no_tensor_value_back_to_the_host():
    """The CPU stand-in for the CUDA sync check below: no op that needs a tensor's values on the host.

    The training log (accuracy, alignment diagnostics) is replaced by a recorder here (on CPU it
    converts to floats at once; on CUDA DeferredScalars defers that, covered by the CUDA test and
    the tests of DeferredScalars).
    """
    model = composed_model("cpu")
    model.train_log = RecordedScalars()
    inputs = batch()
    train_and_infer(model, inputs)               # fills the simplified-prompt cache
    with HostReads() as reads:
        train_and_infer(model, inputs)
    assert reads.seen == []
    logged = model.train_log.values[1]
    assert len(model.train_log.values) == 2 and {"cls_accuracy", "align_i2t_top1"} <= set(logged)
    assert all(value.shape == () for value in logged.values())


@needs_cuda
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_forward_and_backward_never_synchronise_with_the_host(amp):
    model = composed_model("cuda")
    inputs = on("cuda", batch())
    train_and_infer(model, inputs, amp)          # fills the simplified-prompt cache, warms up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_and_infer(model, inputs, amp)      # logs the previous step's accuracy, no sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with EventStorage(0) as storage:             # this step's log is pending until the next
        model.train_log.flush()
    logged = storage.latest()
    assert {"cls_accuracy", "align_i2t_top1", "collapse_v_cos", "pseudo_token_norm_ratio"} <= set(logged)


# ---- the ID loss and the accuracy log, without host reads ----

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_loss_equals_fastreid(eps):
    from fastreid.modeling.losses import cross_entropy_loss as fastreid_ce
    from promptsg.modeling.losses import cross_entropy_loss

    torch.manual_seed(int(eps * 10))
    logits = torch.randn(12, 7, requires_grad=True) * 3
    targets = torch.randint(0, 7, (12,))
    ours, theirs = cross_entropy_loss(logits, targets, eps), fastreid_ce(logits, targets, eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0],
                               rtol=1e-5, atol=1e-7)


def test_cross_entropy_loss_counts_only_non_zero_samples_like_fastreid():
    """Without smoothing, a sample classified with certainty has loss exactly 0 and is not counted."""
    from fastreid.modeling.losses import cross_entropy_loss as fastreid_ce
    from promptsg.modeling.losses import cross_entropy_loss

    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    targets = torch.tensor([0, 0, 2])
    expected = (F.cross_entropy(logits[1:2], targets[1:2]) + F.cross_entropy(logits[2:], targets[2:])) / 2
    torch.testing.assert_close(cross_entropy_loss(logits, targets, 0.0), expected)
    torch.testing.assert_close(fastreid_ce(logits, targets, 0.0), expected)


@pytest.mark.parametrize("margin, norm_feat, hard_mining", [
    (0.3, False, True), (0.3, True, True), (0.0, False, True), (0.0, True, False), (0.5, False, False)])
def test_triplet_loss_equals_fastreid(margin, norm_feat, hard_mining):
    from fastreid.modeling.losses import triplet_loss as fastreid_triplet
    from promptsg.modeling.losses import triplet_loss

    torch.manual_seed(3)
    embedding = torch.randn(16, 8, requires_grad=True)
    targets = torch.arange(4).repeat_interleave(4)
    ours = triplet_loss(embedding, targets, margin, norm_feat, hard_mining)
    theirs = fastreid_triplet(embedding, targets, margin, norm_feat, hard_mining)
    assert ours > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(ours, embedding)[0], torch.autograd.grad(theirs, embedding)[0],
                               rtol=1e-5, atol=1e-7)


def test_triplet_soft_margin_falls_back_to_margin_03_where_it_overflows_like_fastreid():
    from fastreid.modeling.losses import triplet_loss as fastreid_triplet
    from promptsg.modeling.losses import triplet_loss

    # Anchor 0: hardest positive at distance 200, hardest negative at 0.1: log(1 + e^199.9) = inf.
    embedding = torch.tensor([[0.0], [200.0], [0.1], [200.1]])
    targets = torch.tensor([0, 0, 1, 1])
    expected = fastreid_triplet(embedding, targets, 0.0, False, True)
    assert torch.isfinite(expected) and expected > 0
    torch.testing.assert_close(triplet_loss(embedding, targets, 0.0, False, True), expected)


def test_top1_accuracy_equals_fastreid_log_accuracy():
    from fastreid.modeling.losses import log_accuracy
    from promptsg.modeling.losses import top1_accuracy

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 0, 0, 2])
    with EventStorage(0) as storage:
        log_accuracy(logits, targets)
    assert float(top1_accuracy(logits, targets)) == 0.5 == storage.latest()["cls_accuracy"][0]


def test_deferred_scalars_log_cpu_values_at_once():
    from promptsg.utils.deferred_log import DeferredScalars

    log = DeferredScalars()
    with EventStorage(0) as storage:
        log.put({"acc": torch.tensor(0.25), "cos": torch.tensor(0.5)})
        assert storage.latest()["acc"][0] == 0.25 and storage.latest()["cos"][0] == 0.5


@needs_cuda
def test_deferred_scalars_log_cuda_values_one_put_later_under_their_iteration():
    """The GPU is kept busy before it writes the first value: its copy still reads 0.25."""
    from promptsg.utils.deferred_log import DeferredScalars

    log = DeferredScalars()
    with EventStorage(3) as storage:
        value = torch.zeros((), device="cuda")
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        log.put({"acc": value.add_(0.25), "cos": torch.ones((), device="cuda")})
        assert "acc" not in storage.latest()
        storage.iter = 4
        log.put({"acc": torch.tensor(0.75, device="cuda"), "cos": torch.zeros((), device="cuda")})
        assert storage.history("acc").values() == [(0.25, 3)] and storage.history("cos").values() == [(1.0, 3)]
        log.flush()
        assert storage.history("acc").values() == [(0.25, 3), (0.75, 4)]


# ---- the visual-only model skips the patch tokens ----

def test_model_without_mim_skips_patch_tokens_and_keeps_its_features():
    cfg = tiny_cfg(**{"MODEL.PROMPTSG.MIM.CROSS_LAYERS": 0, "MODEL.PROMPTSG.MIM.SELF_LAYERS": 0})
    model = build_model(cfg).eval()
    seen = []
    model.heads.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = batch()["images"]
    with torch.no_grad():
        feat = model(images)
        full = model.backbone(model.preprocess_image(images))
    assert seen[0].tokens is None and full.tokens is not None
    torch.testing.assert_close(seen[0].embedding, full.embedding, rtol=1e-6, atol=1e-6)
    for ours, reference in zip(seen[0].states, full.states):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(feat, model.heads(full), rtol=1e-6, atol=1e-6)


# ---- fused optimizer kernels ----

@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_fused_optimizer_updates_like_the_multi_tensor_one(opt):
    from fastreid.solver import build_lr_scheduler

    cfg = tiny_cfg(**{"SOLVER.OPT": opt, "SOLVER.HEADS_LR_FACTOR": 10.0, "SOLVER.BASE_LR": 1e-3,
                      "SOLVER.WARMUP_ITERS": 2})
    models, optimizers = [], []
    for fused in (True, False):
        cfg.defrost()
        cfg.SOLVER.FUSED = fused
        torch.manual_seed(0)
        model = build_model(cfg)
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model.train())
        optimizers.append(Trainer.build_optimizer(cfg, model)[0])
    initial = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    assert all(g["fused"] for g in optimizers[0].param_groups)
    assert not any(g["fused"] for g in optimizers[1].param_groups)
    schedulers = [build_lr_scheduler(cfg, o, iters_per_epoch=10) for o in optimizers]
    inputs = batch()
    for _ in range(4):
        # Both optimizers get the same gradients (the fused model's): Adam turns the rounding noise
        # of gradients that are zero in exact arithmetic (attention key biases) into full-size steps.
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with EventStorage(0):
            sum(models[0](inputs).values()).backward()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler["lr_sched"].step()
    moved = 0
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += a.requires_grad and not torch.equal(a, initial[name])
    assert moved > 10


def test_fused_optimizer_keeps_classes_without_fused_kernels():
    from promptsg.engine.solver import with_fused_kernels

    optimizer = torch.optim.Rprop(torch.nn.Linear(2, 2).parameters())
    assert with_fused_kernels(optimizer) is optimizer


# ---- torch.compile ----

needs_cxx = pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                               reason="torch.compile on CPU needs a C++ compiler (none on PATH)")


class RecordedFeatures(DatasetEvaluator):
    """A FastReID evaluator that keeps the features it is given."""

    def reset(self):
        self.features = []

    def process(self, inputs, outputs):
        self.features.append(outputs.cpu())

    def evaluate(self):
        return {}


class BatchLoader(list):
    """Batches that FastReID's ``inference_on_dataset`` takes as its data loader."""

    @property
    def dataset(self):
        return range(sum(len(b["targets"]) for b in self))


def train_and_test_like_fastreid(cfg, state, batches):
    """FastReID's training step (SimpleTrainer.run_step: forward, zero_grad, backward, loss log,
    optimizer step) over ``batches``, then its flip-test inference in both prompt modes.

    Returns the model, the logged losses per step, the gradients of each step (those the optimizer
    used), the trained parameters and the features.
    """
    model = build_model(cfg)
    model.load_state_dict(state)
    optimizer, param_wrapper = Trainer.build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, batches, optimizer, param_wrapper)
    grads = []
    with EventStorage(0) as storage:
        for step in range(len(batches)):
            trainer.iter = storage.iter = step
            trainer.run_step()
            grads.append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()
                          if p.grad is not None})
        trainer.flush_metrics()
        losses = {name: storage.history(name).values() for name in storage.histories()
                  if name.startswith("loss_") or name == "total_loss"}
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    features = {}
    for mode in ("composed", "simplified"):
        model.inference_prompt = mode
        recorder = RecordedFeatures()
        inference_on_dataset(model, BatchLoader(dict(b) for b in batches), recorder, flip_test=True)
        features[mode] = torch.cat(recorder.features)
    return model, losses, grads, params, features


@pytest.mark.parametrize("device, mode", [pytest.param("cpu", "default", marks=needs_cxx),
                                          pytest.param("cuda", "reduce-overhead", marks=needs_cuda)])
def test_compiled_model_trains_and_tests_like_eager_through_fastreid(device, mode, tmp_path):
    """MODEL.PROMPTSG.COMPILE through FastReID's trainer step and flip test: three steps give the
    eager losses, gradients and weights, the features match, and the checkpoint is interchangeable.
    On CUDA, ``reduce-overhead`` adds CUDA graphs, whose outputs live only until the next step."""
    from torch._dynamo.utils import counters

    cfg = tiny_cfg(**{"MODEL.DEVICE": device, "MODEL.PROMPTSG.INFERENCE_PROMPT": "composed",
                      "SOLVER.OPT": "SGD", "SOLVER.BASE_LR": 0.01, "SOLVER.HEADS_LR_FACTOR": 1.0,
                      "SOLVER.MOMENTUM": 0.9})
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    batches = []
    for seed in range(3):
        inputs = batch()
        inputs["images"] = torch.rand(inputs["images"].shape, generator=torch.Generator().manual_seed(seed)) * 255
        batches.append(on(device, inputs))
    eager = train_and_test_like_fastreid(cfg, state, batches)
    counters.clear()
    cfg.defrost()
    cfg.MODEL.PROMPTSG.COMPILE = mode
    compiled = train_and_test_like_fastreid(cfg, state, batches)

    (eager_model, eager_losses, eager_grads, eager_params, eager_feats) = eager
    (model, losses, grads, params, feats) = compiled
    assert model.backbone._compiled_call_impl is not None          # it did run compiled
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert losses.keys() == eager_losses.keys() and len(losses) == 5
    for name, history in losses.items():
        assert [it for _, it in history] == [0, 1, 2], name
        torch.testing.assert_close([v for v, _ in history], [v for v, _ in eager_losses[name]],
                                   rtol=1e-3, atol=1e-4, msg=name)
    for step, (grad, eager_grad) in enumerate(zip(grads, eager_grads)):
        assert grad.keys() == eager_grad.keys()
        torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-4, msg=f"step {step}")
    torch.testing.assert_close(params, eager_params, rtol=1e-3, atol=1e-4)   # weights moved by up to 0.08
    assert not torch.equal(params["heads.classifier.weight"], state["heads.classifier.weight"])
    torch.testing.assert_close(feats, eager_feats, rtol=1e-3, atol=5e-4)    # features up to about 4
    torch.save(model.state_dict(), tmp_path / "model.pth")
    eager_model.load_state_dict(torch.load(tmp_path / "model.pth"))  # strict: same keys, no prefix


@pytest.mark.parametrize("mode, steps", [("", 0), ("default", 0), ("reduce-overhead", 3), ("max-autotune", 3)])
def test_each_forward_is_one_cuda_graph_step_and_hands_out_its_own_feature(monkeypatch, mode, steps):
    """With CUDA graphs (modes that add them) every forward starts one graph step, and an
    inference feature is a copy that the next forward cannot overwrite (FastReID's flip test)."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = build_model(tiny_cfg())
    model.compile_mode = mode                    # the forward's contract, without compiling here
    with EventStorage(0):
        model(batch())
    model.eval()
    seen = []
    model.heads.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        features = [model(batch()) for _ in range(2)]
    assert len(marks) == steps
    copies = [f.data_ptr() != s.data_ptr() for f, s in zip(features, seen)]
    assert copies == [bool(steps)] * 2
    torch.testing.assert_close(features[0], seen[0])


def test_compile_mode_is_validated_in_one_line():
    with pytest.raises(ValueError, match="MODEL.PROMPTSG.COMPILE .*'fast'"):
        build_model(tiny_cfg(**{"MODEL.PROMPTSG.COMPILE": "fast"}))


# ---- tools/perf/benchmark.py ----

def load_benchmark():
    return load_tool("tools/perf/benchmark.py")


TINY_OPTS = ["MODEL.CLIP.NAME", "tiny-ViT", "MODEL.CLIP.PRETRAINED", "", "MODEL.PROMPTSG.MIM.HEADS", "2",
             "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "SOLVER.AMP.ENABLED", "False"]


def test_benchmark_prints_json_measurements_and_ratios(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    records = load_benchmark().main([
        "--config-file", str(REPO / "projects/PromptSG/configs/Base-PromptSG.yml"), "--device", "cpu",
        "--iters", "2", "--warmup", "1", "--rounds", "1", "--batch", "8", "--test-batch", "8",
        "--out", str(out), *TINY_OPTS])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == records == [json.loads(line) for line in out.read_text().splitlines()]
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert by_kind["setup"][0]["train_batch"] == 8 and by_kind["setup"][0]["identities"] == 2
    assert {(r["variant"], r["phase"]) for r in by_kind["memory"]} == {
        ("baseline", "train"), ("promptsg", "train"), ("baseline", "visual"),
        ("promptsg", "simplified"), ("promptsg", "composed")}
    assert all(r["state_bytes"] > 0 and r["peak_step_bytes"] >= 0 for r in by_kind["memory"])
    assert {r["variant"] for r in by_kind["train"]} == {"baseline", "promptsg"}
    assert {(r["variant"], r["prompt"]) for r in by_kind["inference"]} == {
        ("baseline", "visual"), ("promptsg", "simplified"), ("promptsg", "composed")}
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in by_kind["train"] + by_kind["inference"])
    ratios = by_kind["ratios"][-1]
    assert records[-1] is ratios
    assert ratios == {**ratios, **expected_ratios(by_kind["summary"][0]["median"])}
    for key in ("inference_simplified_vs_visual", "inference_composed_vs_visual", "train_step_time_vs_baseline"):
        assert isinstance(ratios["meets_targets"][key], bool)


def expected_ratios(median):
    """The ratios from the summary's median step times: throughput PromptSG / visual-only baseline,
    step time PromptSG / baseline."""
    base, psg = median["baseline"], median["promptsg"]
    out = {}
    if "inference_visual_step_s" in base:
        out["inference_simplified_vs_visual"] = base["inference_visual_step_s"] / psg["inference_simplified_step_s"]
        out["inference_composed_vs_visual"] = base["inference_visual_step_s"] / psg["inference_composed_step_s"]
    if "train_step_s" in base:
        out["train_step_time_vs_baseline"] = psg["train_step_s"] / base["train_step_s"]
    return out


@pytest.mark.parametrize("flag, kind, measured", [
    ("--train-only", "train", ["train_step_time_vs_baseline"]),
    ("--inference-only", "inference", ["inference_simplified_vs_visual", "inference_composed_vs_visual"])])
def test_benchmark_times_one_phase_alone_and_gives_its_ratios(capsys, flag, kind, measured):
    records = load_benchmark().main([
        "--config-file", str(REPO / "projects/PromptSG/configs/Base-PromptSG.yml"), "--device", "cpu",
        "--iters", "1", "--warmup", "1", "--rounds", "1", "--batch", "8", "--test-batch", "8", flag, *TINY_OPTS])
    assert {r["kind"] for r in records} == {"setup", "memory", kind, "summary", "ratios"}
    ratios = records[-1]
    assert list(ratios["meets_targets"]) == measured
    expected = expected_ratios(next(r for r in records if r["kind"] == "summary")["median"])
    assert sorted(expected) == sorted(measured)
    for key in ("inference_simplified_vs_visual", "inference_composed_vs_visual", "train_step_time_vs_baseline"):
        assert ratios[key] == expected[key] if key in measured else ratios[key] is None, key
    assert measured[0] in capsys.readouterr().out


@pytest.mark.parametrize("config", ["Base-PromptSG.yml", "Market1501/ablations/map_pool.yml"])
def test_benchmark_baseline_is_the_visual_only_model(config):
    """The baseline of any PromptSG config, map_pool's extra loss included, is the visual-only model."""
    from promptsg.analysis.baseline_benchmark import BASELINE_OVERRIDES, setup_cfg

    cfg = setup_cfg(str(REPO / "projects/PromptSG/configs" / config), TINY_OPTS, "cpu",
                    extra_opts=BASELINE_OVERRIDES)
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    model = build_model(cfg)
    assert model.text is None and model.heads.mim is None and model.heads.inversion is None
