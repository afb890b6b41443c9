"""PromptSG's parts against independent computations (open_clip, the paper's equations)."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import promptsg
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer
from fastreid.modeling import build_model
from fastreid.utils.events import EventStorage
from promptsg.clip_weights import create_clip_model
from promptsg.interaction import MultimodalInteraction, few_query_attention, query_row_forward
from promptsg.inversion import InversionNet
from promptsg.prompt import build_prompt_composer
from promptsg.supcon import supcon_loss, symmetric_supcon_loss

PROMPT, SIMPLE = "A photo of a X person.", "A photo of a person."


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip_model("tiny-ViT", "", (224, 224)).eval()


@pytest.fixture(scope="module")
def composer(clip):
    return build_prompt_composer(clip, "tiny-ViT", PROMPT, SIMPLE)


# ---- prompt composition (Sec. 4.1) ----

def test_prompt_tokens_and_placeholder_position(composer):
    tokenizer = open_clip.get_tokenizer("tiny-ViT")
    x_id = int(tokenizer(["X"])[0][1])
    ids = composer.prompt_ids.tolist()
    # [SOS, a, photo, of, a, X, person, ., EOT]
    assert len(ids) == 9 and composer.placeholder_index == 5 and ids[5] == x_id
    assert ids[-1] == max(ids)                   # EOT, where the embedding is pooled
    assert len(composer.simple_ids) == 8         # EOT at index 7 for "A photo of a person."


def test_pseudo_token_replaces_placeholder_embedding(composer):
    seen = {}
    hook = composer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))  # returns None
    s_star = torch.randn(3, composer.width)
    composer.compose(s_star)
    hook.remove()
    x = seen["x"]
    base = composer.token_embedding(composer.prompt_ids)
    torch.testing.assert_close(x[:, 5], s_star)
    others = [i for i in range(9) if i != 5]
    torch.testing.assert_close(x[:, others], base[others].expand(3, -1, -1))


def test_composed_text_equals_encode_text_when_s_star_is_the_placeholder_embedding(clip, composer):
    tokenizer = open_clip.get_tokenizer("tiny-ViT")
    tokens = tokenizer([PROMPT])                                       # full 77-token context
    s_star = clip.token_embedding(tokens[:, 5])                        # the embedding of "x"
    with torch.no_grad():
        expected = clip.encode_text(tokens)
        got = composer.compose(s_star)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_simplified_prompt_is_computed_once(clip, composer):
    calls = []
    handle = composer.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        composer._simple_cache.clear()
        first = composer.simple(4, "cpu")
        second = composer.simple(16, "cpu")
    finally:
        handle.remove()
    assert len(calls) == 1 and first.shape == (4, 64) and second.shape == (16, 64)
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer("tiny-ViT")([SIMPLE]))
    torch.testing.assert_close(second[:1], expected, rtol=1e-5, atol=1e-5)


def test_simplified_cache_is_refreshed_when_weights_are_loaded(composer):
    before = composer.simple(1, "cpu").clone()
    state = {k: v.clone() for k, v in composer.state_dict().items()}
    state["ln_final.bias"] += 1.0
    composer.load_state_dict(state)
    after = composer.simple(1, "cpu")
    state["ln_final.bias"] -= 1.0
    composer.load_state_dict(state)
    assert not torch.allclose(before, after)


# ---- inversion network f_theta ----

def test_inversion_net_is_a_three_layer_mlp_with_batchnorm_last():
    net = InversionNet(64, 32, 512)
    linears = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 512), (512, 512), (512, 32)]
    assert isinstance(list(net.children())[-1], torch.nn.BatchNorm1d)
    assert net(torch.randn(5, 64)).shape == (5, 32)


# ---- multimodal interaction module (Eq. 7) ----

def test_query_row_forward_equals_the_full_block():
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=1).eval()
    x = torch.randn(2, 7, 32)
    block = mim.blocks[0]
    for index in (0, 3):
        torch.testing.assert_close(query_row_forward(block, x, index), block(x)[:, index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries", [1, 3])
def test_few_query_attention_equals_multihead_attention_values_and_gradients(queries):
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(24, 4, batch_first=True)
    torch.nn.init.normal_(attn.in_proj_bias)      # PyTorch starts the biases at zero
    q, kv = torch.randn(2, queries, 24, requires_grad=True), torch.randn(2, 11, 24, requires_grad=True)
    cotangent = torch.randn(2, queries, 24)
    results = []
    for fn in (lambda: few_query_attention(attn, q, kv), lambda: attn(q, kv, kv, need_weights=False)[0]):
        attn.zero_grad(set_to_none=True)
        q.grad = kv.grad = None
        out = fn()
        (out * cotangent).sum().backward()
        results.append((out.detach(), q.grad, kv.grad, {n: p.grad for n, p in attn.named_parameters()}))
    (out, q_grad, kv_grad, grads), (ref, ref_q_grad, ref_kv_grad, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_grad, ref_q_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv_grad, ref_kv_grad, rtol=1e-5, atol=1e-6)
    # The key bias has no effect on the output (it shifts every logit of a query equally).
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert ref_grads["in_proj_bias"][24:48].abs().max() < 1e-6


def test_cross_attention_is_softmax_qk_v_with_text_as_query():
    torch.manual_seed(0)
    width, heads = 16, 2
    mim = MultimodalInteraction(width, heads=heads, cross_layers=1, self_layers=0).eval()
    blk = mim.cross[0]
    query, patches = torch.randn(3, 1, width), torch.randn(3, 10, width)
    # Eq. 7 by hand, with the block's projections and pre-norms.
    wq, wk, wv = blk.attn.in_proj_weight.chunk(3)
    bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
    q = blk.ln_1(query) @ wq.t() + bq
    k = blk.ln_1_kv(patches) @ wk.t() + bk
    v = blk.ln_1_kv(patches) @ wv.t() + bv
    d = width // heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1) @ split(v)
    attn = attn.transpose(1, 2).reshape(3, 1, width) @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias
    x = query + attn
    expected = (x + blk.mlp(blk.ln_2(x)))[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(mim(query, patches), expected, rtol=1e-5, atol=1e-5)


# ---- symmetric supervised contrastive loss (Eq. 4-6) ----

def _supcon_by_the_equations(v, l, y, tau):
    """Eq. 5 and 6 written out with loops (positives averaged, see supcon.py)."""
    def one_direction(a, c):
        total = 0.0
        for n in range(len(a)):
            sims = [float(F.cosine_similarity(a[n], c[i], dim=0)) / tau for i in range(len(c))]
            log_denominator = math.log(sum(math.exp(s) for s in sims))
            positives = [p for p in range(len(c)) if y[p] == y[n]]
            total += sum(sims[p] - log_denominator for p in positives) / len(positives)
        return -total / len(a)
    return one_direction(v, l), one_direction(l, v)


def test_supcon_matches_equations_4_to_6():
    torch.manual_seed(0)
    v, l = torch.randn(8, 16), torch.randn(8, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    i2t, t2i = _supcon_by_the_equations(v, l, y.tolist(), 0.07)
    assert float(supcon_loss(v, l, y, 0.07)) == pytest.approx(i2t, rel=1e-5)
    assert float(supcon_loss(l, v, y, 0.07)) == pytest.approx(t2i, rel=1e-5)
    assert float(symmetric_supcon_loss(v, l, y, 0.07)) == pytest.approx(i2t + t2i, rel=1e-5)
    assert float(symmetric_supcon_loss(v, l, y, 0.07, i2t=False)) == pytest.approx(t2i, rel=1e-5)
    assert float(symmetric_supcon_loss(v, l, y, 0.07, t2i=False)) == pytest.approx(i2t, rel=1e-5)


def test_supcon_hand_computed_value():
    # Two identities, orthonormal embeddings, each text equal to its image: sim = 1 or 0.
    v = torch.eye(2)
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(supcon_loss(v, v.clone(), torch.tensor([0, 1]), tau)) == pytest.approx(expected, rel=1e-6)


# ---- the meta-architecture ----

def tiny_cfg(**overrides):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file("projects/PromptSG/configs/Base-PromptSG.yml")
    cfg.MODEL.CLIP.NAME = "tiny-ViT"
    cfg.MODEL.CLIP.PRETRAINED = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    cfg.MODEL.PROMPTSG.MIM.HEADS = 2
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.SOLVER.AMP.ENABLED = False
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def batch(n_ids=4, per_id=2):
    torch.manual_seed(0)
    targets = torch.arange(n_ids).repeat_interleave(per_id)
    return {"images": torch.rand(len(targets), 3, 64, 32) * 255, "targets": targets,
            "camids": torch.zeros_like(targets)}


def train_step(model, cfg):
    optimizer, _ = DefaultTrainer.build_optimizer(cfg, model)
    with EventStorage(0):
        losses = model(batch())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return losses, optimizer


def test_text_encoder_is_frozen_and_gradients_reach_the_inversion_net():
    cfg = tiny_cfg()
    model = build_model(cfg)
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    inversion_before = model.heads.inversion.mlp[0].weight.detach().clone()
    losses, optimizer = train_step(model, cfg)
    assert set(losses) == {"loss_cls", "loss_triplet", "loss_triplet_visual", "loss_supcon"}
    assert not any(p.requires_grad for p in model.text.parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.text.parameters())
    for k, v in model.text.state_dict().items():
        assert torch.equal(v, text_before[k]), k
    assert not torch.equal(inversion_before, model.heads.inversion.mlp[0].weight)


def test_new_modules_get_ten_times_the_encoder_learning_rate():
    cfg = tiny_cfg()
    model = build_model(cfg)
    optimizer, _ = DefaultTrainer.build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(5e-6) for p in model.backbone.parameters())
    assert all(lr_of[id(p)] == pytest.approx(5e-5) for p in model.heads.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode, text_runs", [("simplified", 0), ("composed", 2)])
def test_inference_modes(mode, text_runs):
    cfg = tiny_cfg(**{"MODEL.PROMPTSG.INFERENCE_PROMPT": mode})
    model = build_model(cfg).eval()
    with torch.no_grad():
        model(batch())                           # warm the simplified-prompt cache
        calls = []
        handle = model.text.transformer.register_forward_hook(lambda *a: calls.append(1))
        feats = [model(batch()), model(batch())]
        handle.remove()
    assert len(calls) == text_runs
    assert feats[0].shape == (8, 64)
    torch.testing.assert_close(feats[0], feats[1])


def test_simplified_and_composed_inference_differ():
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    with torch.no_grad():
        simplified = model(batch())
        model.inference_prompt = "composed"
        composed = model(batch())
    assert not torch.allclose(simplified, composed)


def test_visual_only_baseline_builds_no_text_tower():
    cfg = tiny_cfg(**{"MODEL.LOSSES.NAME": '("CrossEntropyLoss", "TripletLoss")',
                      "MODEL.PROMPTSG.COMPOSE_TRAIN": "False",
                      "MODEL.PROMPTSG.MIM.CROSS_LAYERS": "0", "MODEL.PROMPTSG.MIM.SELF_LAYERS": "0"})
    model = build_model(cfg)
    assert model.text is None and model.heads.inversion is None and model.heads.mim is None
    losses, _ = train_step(model, cfg)
    assert set(losses) == {"loss_cls", "loss_triplet", "loss_triplet_visual"}
    with torch.no_grad():
        feat = model.eval()(batch())
        torch.testing.assert_close(feat, model.backbone(model.preprocess_image(batch())).embedding)


@pytest.mark.parametrize("overrides, key", [
    ({"MODEL.PROMPTSG.COMPOSE_TRAIN": "False"}, "COMPOSE_TRAIN"),
    ({"MODEL.PROMPTSG.INFERENCE_PROMPT": "both"}, "INFERENCE_PROMPT"),
    ({"MODEL.LOSSES.NAME": '("CrossEntropyLoss", "CircleLoss")'}, "MODEL.LOSSES.NAME"),
    ({"MODEL.PROMPTSG.MIM.CROSS_LAYERS": "0"}, "SELF_LAYERS"),
    ({"INPUT.SIZE_TEST": "[128, 64]"}, "INPUT.SIZE_TEST"),
])
def test_inconsistent_configs_fail_with_one_line_naming_the_key(overrides, key):
    with pytest.raises(ValueError) as info:
        build_model(tiny_cfg(**overrides))
    message = str(info.value)
    assert key in message and "\n" not in message


def test_chance_level_matches_the_mean_ap_of_random_rankings():
    import numpy as np

    from fastreid.evaluation.rank import evaluate_rank
    from promptsg.evaluation import chance_level

    rng = np.random.default_rng(0)
    g_pids = np.array([0] * 3 + [1] * 2 + [2] * 60)          # pid 2: distractor-like negatives
    g_cams = np.array([1, 2, 2, 1, 2] + [3] * 60)
    q_pids, q_cams = np.array([0, 1]), np.array([1, 1])        # valid matches: 2 and 1 of 64
    expected_map, expected_r1 = chance_level(q_pids, q_cams, g_pids, g_cams)
    assert expected_r1 == pytest.approx((2 / 64 + 1 / 64) / 2)
    aps = [np.mean(evaluate_rank(rng.random((2, 65)).astype(np.float32), q_pids, g_pids, q_cams, g_cams,
                                 use_cython=False)[1]) for _ in range(3000)]
    assert np.mean(aps) == pytest.approx(expected_map, rel=0.05)
