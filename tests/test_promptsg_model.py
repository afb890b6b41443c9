"""PromptSG's parts against independent computations (open_clip, the paper's equations)."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import promptsg
from fastreid.config import get_cfg
from fastreid.modeling import build_model
from fastreid.utils.events import EventStorage
from promptsg.engine.trainer import Trainer
from promptsg.modeling.clip_weights import create_clip_model
from promptsg.modeling.interaction import (FUSIONS, MAP_FUSIONS, MultimodalInteraction, PatchWeighting,
                                           few_query_attention, query_row_forward)
from promptsg.modeling.inversion import InversionNet
from promptsg.modeling.prompt import build_prompt_composer
from promptsg.modeling.supcon import supcon_loss, symmetric_supcon_loss

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


def test_inversion_net_output_by_hand_relu_between_every_linear_layer():
    """s* = BN(W3 relu(W2 relu(W1 v + b1) + b2) + b3), from the layers' own weights (a lost
    activation turns two layers into one linear map and changes the output)."""
    torch.manual_seed(0)
    net = InversionNet(16, 8, 32).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    l1, l2, l3 = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    v = torch.randn(5, 16)
    h = torch.relu(v @ l1.weight.T + l1.bias)
    h = torch.relu(h @ l2.weight.T + l2.bias)
    h = h @ l3.weight.T + l3.bias
    expected = (h - net.bn.running_mean) / torch.sqrt(net.bn.running_var + net.bn.eps) * net.bn.weight + net.bn.bias
    torch.testing.assert_close(net(v), expected, rtol=1e-5, atol=1e-5)


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
    mim = MultimodalInteraction(width, heads=heads, cross_layers=1, self_layers=0, fusion="attention").eval()
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
    expected = (attn + blk.mlp(blk.ln_2(attn)))[:, 0]      # Eq. 7 alone: no residual from the query
    with torch.no_grad():
        torch.testing.assert_close(mim(query, patches), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion, contrast", [(f, 2.0) for f in FUSIONS] + [("learned_map", 4.0), ("learned_map", 0.5)])
@pytest.mark.parametrize("queries, out_index", [(1, 0), (4, 3)])
def test_each_mim_fusion_equals_its_formula_on_full_length_blocks(fusion, contrast, queries, out_index):
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion=fusion, map_contrast=contrast).eval()
    randomise_biases(mim)
    query, patches, v = torch.randn(3, queries, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(mim(query, patches, out_index, v), reference_mim(mim, query, patches, out_index, v),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", MAP_FUSIONS)
def test_a_uniform_map_leaves_the_blocks_plain_and_a_peaked_map_reads_that_patch(fusion):
    """The map's bias log(M a) is zero where a is uniform, so the feature is then open_clip's blocks
    over [v; patches] read at v; as the contrast grows, v's attention in each block goes to the
    patch the map peaks on."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion=fusion).eval()
    randomise_biases(mim)
    query, patches, v = torch.randn(2, 1, 32), torch.randn(2, 6, 32), torch.randn(2, 32)
    plain = torch.cat([v[:, None], patches], dim=1)
    for block in mim.blocks:
        plain = block(plain)
    with torch.no_grad():
        uniform = patches[:, :1].expand(-1, 6, -1)        # every patch alike: every logit equal, a = 1/M
        same = torch.cat([v[:, None], uniform], dim=1)
        for block in mim.blocks:
            same = block(same)
        torch.testing.assert_close(mim(query, uniform, 0, v), same[:, 0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mim(query, patches, 0, v), plain[:, 0], atol=1e-3)   # a real map acts
        mim.map_contrast = 1e4
        peak = mim.log_prompt_map(query, patches).argmax(dim=-1)
        assert (mim.cross_attention_weights(query, patches)[0][:, 0, 0].max(dim=-1).values > 0.999).all()
        first = mim.blocks[0]
        normed = first.ln_1(torch.cat([v[:, None], patches], dim=1))
        bias = torch.cat([torch.zeros(2, 1), mim.log_prompt_map(query, patches) + math.log(6)], dim=1)
        read = promptsg.modeling.interaction.few_query_attention_weights(first.attn, normed[:, :1], normed, bias)
        # v's own key keeps bias 0, each non-peak patch gets about -1e4 * gap: the weight left to the
        # patches is all on the peak.
        on_patches = read[:, 0, :, 1:]
        torch.testing.assert_close(on_patches.argmax(dim=-1), peak[:, None].expand(-1, 4))


def test_the_learned_map_cannot_be_flattened_by_scaling_its_logits():
    """The learned map's logits are standardised over the patches: scaling the query projection (a
    flatter softmax in the raw logits) leaves the map and the feature unchanged."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map").eval()
    randomise_biases(mim)
    query, patches, v = torch.randn(3, 1, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    with torch.no_grad():
        before_map, before = mim.cross_attention_weights(query, patches)[0], mim(query, patches, 0, v)
        mim.cross[0].q_proj.weight.mul_(0.1)
        mim.cross[0].q_proj.bias.mul_(0.1)
        torch.testing.assert_close(mim.cross_attention_weights(query, patches)[0], before_map, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mim(query, patches, 0, v), before, rtol=1e-3, atol=1e-4)
        # ... while the raw softmax the map is taken from has flattened.
        raw = mim.cross[0](query, patches).mean(dim=2)[:, 0]
        assert float(raw.max()) < float(before_map.max())


def test_default_mim_reads_the_query_only_through_its_map():
    """The default fusion has no value path from the prompt: two queries with the same map give the
    same feature. LayerNorm makes q and 3q + 0.5 the same normalised query (same map)."""
    model = build_model(tiny_cfg()).eval()
    mim = model.heads.mim
    assert mim.fusion == "learned_map"
    randomise_biases(mim)
    torch.manual_seed(1)
    width = model.backbone.out_dim
    query, patches, v = torch.randn(4, 1, width), torch.randn(4, 32, width), torch.randn(4, width)
    other = 3.0 * query + 0.5
    with torch.no_grad():
        for a, b in zip(mim.cross_attention_weights(query, patches, v), mim.cross_attention_weights(other, patches, v)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mim(query, patches, 0, v), mim(other, patches, 0, v), rtol=1e-4, atol=1e-5)
        # ... while a query with another map changes the feature.
        assert not torch.allclose(mim(query, patches, 0, v), mim(torch.randn(4, 1, width), patches, 0, v), atol=1e-3)


def test_patch_weighting_is_softmax_qk_per_head():
    torch.manual_seed(0)
    weighting = PatchWeighting(24, 3)
    torch.nn.init.normal_(weighting.q_proj.bias)
    query, patches = torch.randn(2, 2, 24), torch.randn(2, 7, 24)
    q = weighting.q_proj(weighting.ln_1(query)).view(2, 2, 3, 8)
    k = (weighting.ln_1_kv(patches) @ weighting.k_proj.weight.t()).view(2, 7, 3, 8)
    expected = torch.stack([torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(8), dim=-1)
                            for h in range(3)], dim=2)                                # (B, Q, H, M)
    torch.testing.assert_close(weighting(query, patches), expected, rtol=1e-5, atol=1e-6)


def randomise_biases(mim):
    """PyTorch starts attention and LayerNorm biases at zero, which hides where a bias goes."""
    for name, param in mim.named_parameters():
        if name.endswith("bias") or "ln" in name:
            torch.nn.init.normal_(param, mean=1.0 if name.endswith("weight") else 0.0, std=0.3)


# ---- symmetric supervised contrastive loss (Eq. 4-6) ----

def _supcon_by_the_equations(v, l, y, tau, positives="sum"):
    """Eq. 5 and 6 written out with loops: the sum over the positives, or their mean."""
    def one_direction(a, c):
        total = 0.0
        for n in range(len(a)):
            sims = [float(F.cosine_similarity(a[n], c[i], dim=0)) / tau for i in range(len(c))]
            log_denominator = math.log(sum(math.exp(s) for s in sims))
            terms = [sims[p] - log_denominator for p in range(len(c)) if y[p] == y[n]]
            total += sum(terms) / (len(terms) if positives == "mean" else 1)
        return -total / len(a)
    return one_direction(v, l), one_direction(l, v)


@pytest.mark.parametrize("positives", ["sum", "mean"])
def test_supcon_matches_equations_4_to_6(positives):
    torch.manual_seed(0)
    v, l = torch.randn(8, 16), torch.randn(8, 16)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])                 # 3, 2, 1 and 2 positives
    i2t, t2i = _supcon_by_the_equations(v, l, y.tolist(), 0.07, positives)
    assert float(supcon_loss(v, l, y, 0.07, positives)) == pytest.approx(i2t, rel=1e-5)
    assert float(supcon_loss(l, v, y, 0.07, positives)) == pytest.approx(t2i, rel=1e-5)
    both = lambda **kw: float(symmetric_supcon_loss(v, l, y, 0.07, positives=positives, **kw))  # noqa: E731
    assert both() == pytest.approx(i2t + t2i, rel=1e-5)
    assert both(i2t=False) == pytest.approx(t2i, rel=1e-5)
    assert both(t2i=False) == pytest.approx(i2t, rel=1e-5)


def test_supcon_sum_is_k_times_the_mean_with_k_images_per_identity():
    torch.manual_seed(0)
    v, l = torch.randn(12, 16), torch.randn(12, 16)
    y = torch.arange(3).repeat_interleave(4)
    assert float(supcon_loss(v, l, y, 0.1, "sum")) == pytest.approx(4 * float(supcon_loss(v, l, y, 0.1, "mean")))


def test_supcon_hand_computed_value():
    # Two identities, orthonormal embeddings, each text equal to its image: sim = 1 or 0.
    v = torch.eye(2)
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(supcon_loss(v, v.clone(), torch.tensor([0, 1]), tau)) == pytest.approx(expected, rel=1e-6)


# ---- the meta-architecture ----

def tiny_cfg(default_map=False, **overrides):
    """A tiny-ViT PromptSG on Base-PromptSG.yml. The map's keys are the final patch tokens and it has
    no prior, power 1 if one is set (the plain map the references below write out), unless
    ``default_map``: then the default's keys, prior and power."""
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file("projects/PromptSG/configs/Base-PromptSG.yml")
    if not default_map:
        cfg.MODEL.PROMPTSG.MIM.MAP_KEYS, cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR = "", ""
        cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER = 1.0
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
    optimizer, _ = Trainer.build_optimizer(cfg, model)
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
    optimizer, _ = Trainer.build_optimizer(cfg, model)
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
    from promptsg.engine.evaluation import chance_level

    rng = np.random.default_rng(0)
    g_pids = np.array([0] * 3 + [1] * 2 + [2] * 60)          # pid 2: distractor-like negatives
    g_cams = np.array([1, 2, 2, 1, 2] + [3] * 60)
    q_pids, q_cams = np.array([0, 1]), np.array([1, 1])        # valid matches: 2 and 1 of 64
    expected_map, expected_r1 = chance_level(q_pids, q_cams, g_pids, g_cams)
    assert expected_r1 == pytest.approx((2 / 64 + 1 / 64) / 2)
    aps = [np.mean(evaluate_rank(rng.random((2, 65)).astype(np.float32), q_pids, g_pids, q_cams, g_cams,
                                 use_cython=False)[1]) for _ in range(3000)]
    assert np.mean(aps) == pytest.approx(expected_map, rel=0.05)


# ---- alignment diagnostics (what the training log shows) ----

def test_mean_pairwise_cosine_by_hand():
    from promptsg.modeling.diagnostics import mean_pairwise_cosine

    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])   # pairs: cos 1, 0, 0
    assert float(mean_pairwise_cosine(x)) == pytest.approx(1 / 3)
    assert float(mean_pairwise_cosine(torch.tensor([[1.0, 1.0]] * 4))) == pytest.approx(1.0)


def test_in_batch_top1_by_hand():
    from promptsg.modeling.diagnostics import in_batch_top1

    targets = torch.tensor([0, 0, 1])
    similarity = torch.tensor([[0.9, 0.1, 0.5],     # row 0 -> column 0: same identity
                               [0.1, 0.2, 0.8],     # row 1 -> column 2: other identity
                               [0.7, 0.3, 0.6]])    # row 2 -> column 0: other identity
    rows, cols = in_batch_top1(similarity, targets)
    assert float(rows) == pytest.approx(1 / 3)
    # columns: 0 -> row 0 (same), 1 -> row 2 (other), 2 -> row 1 (other)
    assert float(cols) == pytest.approx(1 / 3)
    # Rows (image -> prompt) and columns (prompt -> image) apart: 1/3 and 2/3.
    similarity = torch.tensor([[0.9, 0.1, 0.95],    # row 0 (id 0) -> column 2 (id 1): miss
                               [0.2, 0.3, 0.1],     # row 1 (id 0) -> column 1 (id 0): hit
                               [0.8, 0.2, 0.6]])    # row 2 (id 1) -> column 0 (id 0): miss
    rows, cols = in_batch_top1(similarity, targets)
    assert float(rows) == pytest.approx(1 / 3)
    # columns: 0 (id 0) -> row 0 (hit), 1 (id 0) -> row 1 (hit), 2 (id 1) -> row 0 (miss)
    assert float(cols) == pytest.approx(2 / 3)


def test_model_logs_its_batch_accuracy_and_alignment_diagnostics():
    """The logged values equal the same quantities computed by hand from the model's own tensors."""
    model = build_model(tiny_cfg()).train()
    seen = {}
    model.backbone.register_forward_hook(lambda m, args, out: seen.update(v=out.embedding))
    model.heads.inversion.register_forward_hook(lambda m, args, out: seen.update(s=out))
    model.heads.classifier.register_forward_hook(lambda m, args, out: seen.update(logits=out))
    compose = model.text.compose
    model.text.compose = lambda s, **kw: seen.setdefault("l", compose(s, **kw))
    inputs = batch()
    with EventStorage(0) as storage:
        model(inputs)
    logged = {k: v[0] for k, v in storage.latest().items()}
    v, s, l, y = seen["v"].detach(), seen["s"].detach(), seen["l"].detach(), inputs["targets"].tolist()
    n = len(y)
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    i2t = sum(y[max(range(n), key=lambda j: cos(v[i], l[j]))] == y[i] for i in range(n)) / n
    t2i = sum(y[max(range(n), key=lambda i: cos(v[i], l[j]))] == y[j] for j in range(n)) / n
    token_norm = sum(float(e.norm()) for e in model.text.token_embedding.weight) / len(model.text.token_embedding.weight)
    expected = {
        "cls_accuracy": sum(int(seen["logits"][i].argmax()) == y[i] for i in range(n)) / n,
        "align_i2t_top1": i2t,
        "align_t2i_top1": t2i,
        "collapse_v_cos": sum(cos(v[i], v[j]) for i, j in pairs) / len(pairs),
        "collapse_text_cos": sum(cos(l[i], l[j]) for i, j in pairs) / len(pairs),
        "pseudo_token_norm_ratio": sum(float(x.norm()) for x in s) / n / token_norm,
    }
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ---- wiring: which tensors each loss and module sees (Fig. 3, Eq. 10) ----
# Each expected value is recomputed from the encoder's captured outputs with the model's own
# modules run by hand (open_clip's blocks at full length, FastReID's losses, the loops above), so
# a loss applied to the wrong tensor, a dropped factor or a mis-wired module shows as a mismatch.

from fastreid.modeling.losses import cross_entropy_loss as fastreid_cross_entropy  # noqa: E402
from fastreid.modeling.losses import triplet_loss as fastreid_triplet  # noqa: E402

TAU = 0.05


def reference_mim(mim, query, patches, out_index, visual):
    """The MIM by open_clip's blocks and PyTorch's attention at full length (keys and values
    projected), each fusion written out: "attention", the cross-attention A(q, P) of the query over
    the patches (no residual from q), the block's MLP residual, then open_clip's self-attention
    blocks over [x; patches] read at ``out_index``; the map fusions, ``reference_map_fusion``."""
    if mim.fusion in MAP_FUSIONS:
        return reference_map_fusion(mim, reference_map(mim, query[:, out_index:out_index + 1], patches), patches, visual)
    for block in mim.cross:
        kv = block.ln_1_kv(patches)
        x = block.attn(block.ln_1(query), kv, kv, need_weights=False)[0]
        query = x + block.mlp(block.ln_2(x))
    x = torch.cat([query, patches], dim=1)
    for block in mim.blocks:
        x = block(x)
    return x[:, out_index]


def reference_map(mim, query, patches):
    """The prompt's map a (B, M) by hand: logits z_m, the mean over heads of q_h . k_h,m / sqrt(d)
    ("learned_map"), standardised over the M patches (unbiased std), then softmax(contrast * z)."""
    batch, m = patches.shape[:2]
    blk = mim.cross[0]
    heads, d = blk.num_heads, patches.shape[-1] // blk.num_heads
    q = blk.q_proj(blk.ln_1(query))[:, 0]                                            # (B, E)
    k = blk.ln_1_kv(patches) @ blk.k_proj.weight.t()                                 # (B, M, E)
    logits = torch.zeros(batch, m)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        logits += (k[..., part] @ q[:, part, None])[..., 0] / math.sqrt(d) / heads
    mean = logits.mean(dim=1, keepdim=True)
    std = ((logits - mean) ** 2).sum(dim=1, keepdim=True).div(m - 1).sqrt()
    return torch.softmax(mim.map_contrast * (logits - mean) / (std + 1e-6), dim=1)


def reference_map_fusion(mim, weights, patches, visual):
    """The map fusions written out with loops over the heads: [v; patches] through the blocks, whose
    attention per head is softmax(q k^T / sqrt(d) + b) (W_v LN(x) + b_v), the bias b = [0, log(M a)]
    on v's row (row 0) only and 0 on every other row; the feature is v's row of the last block."""
    batch, m = weights.shape
    bias = torch.zeros(batch, m + 1, m + 1)
    bias[:, 0, 1:] = torch.log(m * weights)
    x = torch.cat([visual[:, None], patches], dim=1)
    for block in mim.blocks:
        attn, normed = block.attn, block.ln_1(x)
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q, k, v = normed @ w_q.T + b_q, normed @ w_k.T + b_k, normed @ w_v.T + b_v
        d = q.shape[-1] // attn.num_heads
        heads = []
        for h in range(attn.num_heads):
            part = slice(h * d, (h + 1) * d)
            logits = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d) + bias
            heads.append(logits.softmax(dim=-1) @ v[..., part])
        x = x + attn.out_proj(torch.cat(heads, dim=-1))
        x = x + block.mlp(block.ln_2(x))
    return x[:, 0]


def run_capturing_visual(model, inputs):
    """The model's output and the visual encoder's output (v keeps its gradient)."""
    seen = {}

    def keep(module, args, out):
        out.embedding.retain_grad() if out.embedding.requires_grad else None
        seen["visual"] = out

    handle = model.backbone.register_forward_hook(keep)
    try:
        with EventStorage(0):
            out = model(inputs)
    finally:
        handle.remove()
    return out, seen["visual"]


def supcon_by_loops(v, l, y):
    i2t, t2i = _supcon_by_the_equations(v, l, y.tolist(), TAU, "sum")
    return 0.5 * (i2t + t2i)


def test_training_losses_are_eq10_on_the_right_tensors():
    """L_ID and L_Triplet on the MIM output (the MIM queried by l_p = T(f_theta(v))), the triplet also
    on each visual state, summed, and lambda * L_SupCon between v and l_p."""
    model = build_model(tiny_cfg(**{"MODEL.LOSSES.SUPCON.TEMPERATURE": TAU})).train()
    inputs = batch()
    y = inputs["targets"]
    losses, visual = run_capturing_visual(model, inputs)
    with torch.no_grad():
        v = visual.embedding
        l_p = model.text.compose(model.heads.inversion(v))
        feat = reference_mim(model.heads.mim, l_p[:, None], visual.tokens, 0, visual.embedding)
        logits = model.heads.classifier(model.heads.bottleneck(feat))
        expected = {
            "loss_cls": fastreid_cross_entropy(logits, y, 0.1, 0.2),
            "loss_triplet": fastreid_triplet(feat, y, 0.3, False, True),
            "loss_triplet_visual": sum(fastreid_triplet(s, y, 0.3, False, True) for s in visual.states),
            "loss_supcon": supcon_by_loops(v, l_p, y),
        }
    assert len(visual.states) == 3 and set(losses) == set(expected)
    for key, value in expected.items():
        assert float(losses[key].detach()) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_supcon_gradient_reaches_v_directly_and_through_f_theta():
    model = build_model(tiny_cfg(**{"MODEL.LOSSES.SUPCON.TEMPERATURE": TAU})).train()
    inputs = batch()
    losses, visual = run_capturing_visual(model, inputs)
    losses["loss_supcon"].backward()
    v = visual.embedding.detach().requires_grad_()
    l_p = model.text.compose(model.heads.inversion(v))
    a, c = F.normalize(v, dim=1), F.normalize(l_p, dim=1)
    positive = (inputs["targets"][:, None] == inputs["targets"][None, :]).float()
    i2t = -(F.log_softmax(a @ c.t() / TAU, dim=1) * positive).sum(1).mean()
    t2i = -(F.log_softmax(c @ a.t() / TAU, dim=1) * positive).sum(1).mean()
    expected, = torch.autograd.grad(0.5 * (i2t + t2i), v, retain_graph=True)
    torch.testing.assert_close(visual.embedding.grad, expected, rtol=1e-4, atol=1e-6)
    # The path through f_theta matters: without it the gradient is another one.
    l_fixed = l_p.detach()
    c = F.normalize(l_fixed, dim=1)
    cut = -(F.log_softmax(a @ c.t() / TAU, dim=1) * positive).sum(1).mean() \
        - (F.log_softmax(c @ a.t() / TAU, dim=1) * positive).sum(1).mean()
    without_f_theta, = torch.autograd.grad(0.5 * cut, v)
    assert not torch.allclose(expected, without_f_theta, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("query, out_index", [("pooled", 0), ("tokens", 8)])
def test_test_feature_is_the_mim_output_at_the_query_position(query, out_index):
    """Composed prompt at test time: pooled l_p as the one query, or every prompt token with the
    feature read at the end-of-text token ("A photo of a X person." has it at index 8)."""
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.MIM.QUERY": query,
                                    "MODEL.PROMPTSG.INFERENCE_PROMPT": "composed"})).eval()
    inputs = batch()
    with torch.no_grad():
        feat, visual = run_capturing_visual(model, inputs)
        pooled, tokens = model.text.compose(model.heads.inversion(visual.embedding), return_tokens=True)
        queries = pooled[:, None] if query == "pooled" else tokens
        expected = reference_mim(model.heads.mim, queries, visual.tokens, out_index, visual.embedding)
    assert tokens.shape[1] == 9
    torch.testing.assert_close(feat, expected, rtol=1e-4, atol=1e-5)


def test_visual_only_model_applies_each_triplet_once():
    """Without a MIM the feature is v: L_Triplet on v, the state triplets on x_{L-1} and x_L only."""
    cfg = tiny_cfg(**{"MODEL.LOSSES.NAME": '("CrossEntropyLoss", "TripletLoss")',
                      "MODEL.PROMPTSG.COMPOSE_TRAIN": "False",
                      "MODEL.PROMPTSG.MIM.CROSS_LAYERS": "0", "MODEL.PROMPTSG.MIM.SELF_LAYERS": "0"})
    model = build_model(cfg).train()
    inputs = batch()
    y = inputs["targets"]
    losses, visual = run_capturing_visual(model, inputs)
    with torch.no_grad():
        x_prev, x_last, v = visual.states
        logits = model.heads.classifier(model.heads.bottleneck(v))
        expected = {
            "loss_cls": fastreid_cross_entropy(logits, y, 0.1, 0.2),
            "loss_triplet": fastreid_triplet(v, y, 0.3, False, True),
            "loss_triplet_visual": fastreid_triplet(x_prev, y, 0.3, False, True)
            + fastreid_triplet(x_last, y, 0.3, False, True),
        }
    assert v is visual.embedding and set(losses) == set(expected)
    for key, value in expected.items():
        assert float(losses[key].detach()) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_pseudo_tokens_start_distributed_like_the_word_embeddings():
    """PSEUDO_TOKEN_INIT token: in a training batch s* has the word embeddings' per-dimension mean
    and standard deviation (BatchNorm standardises, then applies them; its eps shrinks the standard
    deviation by sqrt(var / (var + eps))); unit: PyTorch's 0 and 1, a norm far above any word's."""
    inputs = batch()
    norms = {}
    for init in ("token", "unit"):
        model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.PSEUDO_TOKEN_INIT": init})).train()
        table = model.text.token_embedding.weight.detach()
        with torch.no_grad():
            v = model.backbone(model.preprocess_image(inputs), with_tokens=False).embedding
            s = model.heads.inversion(v)
            var = model.heads.inversion.mlp(v).var(0, unbiased=False)
        mean, std = (table.mean(0), table.std(0)) if init == "token" else (torch.zeros(64), torch.ones(64))
        torch.testing.assert_close(s.mean(0), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.std(0, unbiased=False), std * (var / (var + 1e-5)).sqrt(), rtol=1e-3, atol=1e-6)
        norms[init] = float(s.norm(dim=1).mean())
    word = float(table.norm(dim=1).mean())
    assert norms["token"] < 2 * word and norms["unit"] > 10 * word


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_simplified_query_share_replaces_the_mim_query_not_the_supcon_prompt(share):
    model = build_model(tiny_cfg(**{"MODEL.LOSSES.SUPCON.TEMPERATURE": TAU,
                                    "MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE": share})).train()
    seen = {}
    model.heads.register_forward_pre_hook(lambda m, args: seen.update(query=args[1]))
    inputs = batch()
    losses, visual = run_capturing_visual(model, inputs)
    with torch.no_grad():
        l_p = model.text.compose(model.heads.inversion(visual.embedding))
        simple = model.text.simple(len(l_p), "cpu")
    torch.testing.assert_close(seen["query"][:, 0], simple if share == 1.0 else l_p)
    assert float(losses["loss_supcon"].detach()) == pytest.approx(
        supcon_by_loops(visual.embedding.detach(), l_p, inputs["targets"]), rel=1e-5)


def test_simplified_query_share_mixes_per_image():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE": 0.5})).train()
    query = torch.randn(400, 1, 64)
    mixed = model.mix_simplified_query(query)
    simple = model.text.simple(1, "cpu")[0]
    is_simple = (mixed[:, 0] == simple).all(1)
    assert torch.equal(mixed[~is_simple], query[~is_simple])
    assert 0.4 < float(is_simple.float().mean()) < 0.6                     # 200 +- 10 expected


def test_visual_only_model_logs_the_collapse_of_v_and_no_prompt_diagnostics():
    cfg = tiny_cfg(**{"MODEL.LOSSES.NAME": '("CrossEntropyLoss", "TripletLoss")',
                      "MODEL.PROMPTSG.COMPOSE_TRAIN": "False",
                      "MODEL.PROMPTSG.MIM.CROSS_LAYERS": "0", "MODEL.PROMPTSG.MIM.SELF_LAYERS": "0"})
    model = build_model(cfg).train()
    seen = {}
    model.backbone.register_forward_hook(lambda m, args, out: seen.update(v=out.embedding.detach()))
    with EventStorage(0) as storage:
        model(batch())
    logged = {k: v[0] for k, v in storage.latest().items()}
    v = seen["v"]
    pairs = [(i, j) for i in range(len(v)) for j in range(len(v)) if i != j]
    expected = sum(float(F.cosine_similarity(v[i], v[j], dim=0)) for i, j in pairs) / len(pairs)
    assert set(logged) == {"cls_accuracy", "collapse_v_cos"}
    assert logged["collapse_v_cos"] == pytest.approx(expected, rel=1e-5)


def test_concat_feature_is_the_mim_output_then_v():
    """``MODEL.PROMPTSG.FEATURE concat``: the test feature is [MIM output, v], in that order."""
    from promptsg.modeling.clip_backbone import CLIPVisualOutput
    from promptsg.modeling.heads import PromptSGHead

    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, token_dim=8, num_classes=3, use_inversion=False, inversion_hidden=16,
                  mim_cross_layers=1, mim_self_layers=2, mim_heads=2, neck_feat="before")
    head = PromptSGHead(feature="concat", **kwargs).eval()
    visual = CLIPVisualOutput(torch.randn(4, 16), torch.randn(4, 6, 16), [])
    query = torch.randn(4, 1, 16)
    feat = head(visual, query)
    assert feat.shape == (4, 32)
    torch.testing.assert_close(feat[:, :16], head.mim(query, visual.tokens, 0, visual.embedding))
    torch.testing.assert_close(feat[:, 16:], visual.embedding)
    mim_only = PromptSGHead(feature="mim", **kwargs).eval()
    mim_only.mim.load_state_dict(head.mim.state_dict())
    torch.testing.assert_close(mim_only(visual, query), feat[:, :16])


@pytest.mark.parametrize("fusion", MAP_FUSIONS)
def test_read_attention_is_vs_biased_row_of_each_block_by_hand(fusion):
    """``read_attention_weights``: per block and head, softmax over [v; patches] of v's logits
    q_0 . k_n / sqrt(d) plus the map's bias [0, log(M a)], on the states the forward computes; its last
    block is where the feature looks (``guidance`` read_share)."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion=fusion).eval()
    randomise_biases(mim)
    query, patches, v = torch.randn(3, 1, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    a = reference_map(mim, query, patches)
    bias = torch.cat([torch.zeros(3, 1), torch.log(10 * a)], dim=1)
    x, expected = torch.cat([v[:, None], patches], dim=1), []
    for block in mim.blocks:
        attn, normed = block.attn, block.ln_1(x)
        w_q, w_k, _ = attn.in_proj_weight.chunk(3)
        b_q, b_k, _ = attn.in_proj_bias.chunk(3)
        q, k = normed[:, 0] @ w_q.T + b_q, normed @ w_k.T + b_k
        d = 32 // attn.num_heads
        expected.append(torch.stack([
            (torch.einsum("bd,bnd->bn", q[:, h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]) / math.sqrt(d) + bias)
            .softmax(dim=-1) for h in range(attn.num_heads)], dim=1))                      # (B, H, 1 + M)
        x = reference_map_fusion_states(mim, block, x, bias)
    with torch.no_grad():
        got = mim.read_attention_weights(query, patches, v)
    assert len(got) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no read row"):
        MultimodalInteraction(32, heads=4, fusion="attention").read_attention_weights(query, patches, v)


def test_the_map_prior_weighs_the_prompts_map_by_the_encoders_cls_attention():
    """MIM.MAP_PRIOR cls_attention: a is proportional to softmax(contrast * z)_m c_m, written out by
    hand, and the feature is the map fusion with that a; a uniform prior gives the plain map; the
    prior is read, not trained through; a module is refused the wrong inputs."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map", map_prior=True)
    randomise_biases(mim)
    plain = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map")
    plain.load_state_dict(mim.state_dict())
    query, patches, v = torch.randn(3, 1, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    c = torch.rand(3, 10) + 0.05
    c = c / c.sum(dim=1, keepdim=True)
    log_prior = c.log().requires_grad_()
    with torch.no_grad():
        expected = reference_map(mim, query, patches) * c
        expected = expected / expected.sum(dim=1, keepdim=True)
        torch.testing.assert_close(mim.cross_attention_weights(query, patches, v, log_prior)[0][:, 0, 0], expected,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mim(query, patches, 0, v, log_prior=log_prior),
                                   reference_map_fusion(mim, expected, patches, v), rtol=1e-4, atol=1e-5)
        uniform = torch.full((3, 10), -math.log(10))
        torch.testing.assert_close(mim(query, patches, 0, v, log_prior=uniform), plain(query, patches, 0, v),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mim(query, patches, 0, v, log_prior=log_prior), plain(query, patches, 0, v), atol=1e-3)
    mim.train()
    feat, pool = mim(query, patches, 0, v, with_map_pool=True, log_prior=log_prior)
    (feat.square().sum() + pool.square().sum()).backward()
    assert log_prior.grad is None
    with pytest.raises(ValueError, match="needs log_prior"):
        mim(query, patches, 0, v)
    with pytest.raises(ValueError, match="was given a log_prior"):
        plain(query, patches, 0, v, log_prior=log_prior)
    with pytest.raises(ValueError, match="no map"):
        MultimodalInteraction(32, heads=4, fusion="attention", map_prior=True)


def test_the_prior_power_raises_the_encoders_attention_before_it_weighs_the_map():
    """MIM.MAP_PRIOR_POWER p: a is proportional to softmax(contrast * z)_m c_m^p, written out by hand;
    p = 1 is the prior as it was; a power without a prior is refused."""
    torch.manual_seed(1)
    sharp = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map", map_prior=True,
                                  prior_power=2.5)
    randomise_biases(sharp)
    query, patches, v = torch.randn(3, 1, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    c = torch.rand(3, 10) + 0.05
    c = c / c.sum(dim=1, keepdim=True)
    with torch.no_grad():
        expected = reference_map(sharp, query, patches) * c ** 2.5
        expected = expected / expected.sum(dim=1, keepdim=True)
        torch.testing.assert_close(sharp.cross_attention_weights(query, patches, v, c.log())[0][:, 0, 0], expected,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sharp(query, patches, 0, v, log_prior=c.log()),
                                   reference_map_fusion(sharp, expected, patches, v), rtol=1e-4, atol=1e-5)
        # The same module at power 1 weighs the map by c itself.
        sharp.prior_power = 1.0
        once = reference_map(sharp, query, patches) * c
        torch.testing.assert_close(sharp.cross_attention_weights(query, patches, v, c.log())[0][:, 0, 0],
                                   once / once.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert sharp.map_scales.tolist() == [2.0, 2.5]          # saved with the weights (checkpoint.check_mim_fusion)
    with pytest.raises(ValueError, match="prior_power 2.0 needs map_prior"):
        MultimodalInteraction(32, heads=4, fusion="learned_map", prior_power=2.0)


def test_a_model_with_the_map_prior_gives_the_feature_of_its_encoders_cls_attention():
    """End to end (MODEL.PROMPTSG.MIM.MAP_PRIOR cls_attention): the test feature is the map fusion
    whose map is the simplified prompt's, weighted by the encoder's last-block CLS attention."""
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.MIM.MAP_PRIOR": "cls_attention"})).eval()
    assert model.heads.needs_cls_attention
    randomise_biases(model.heads.mim)
    inputs = batch()
    with torch.no_grad():
        feat = model(inputs)
        visual = model.backbone(model.preprocess_image(inputs), with_tokens=True, with_cls_attention=True)
        l_p = model.text.simple(len(feat), feat.device)
        c = visual.log_cls_attention.exp()
        a = reference_map(model.heads.mim, l_p[:, None], visual.tokens) * c
        expected = reference_map_fusion(model.heads.mim, a / a.sum(dim=1, keepdim=True), visual.tokens,
                                        visual.embedding)
    assert model.heads.neck_feat == "before"      # the test feature is the MIM's output itself
    torch.testing.assert_close(feat, expected, rtol=1e-4, atol=1e-5)


def test_penultimate_keys_make_the_prompts_map_from_the_keys_given_and_the_feature_from_the_patches():
    """MIM.MAP_KEYS penultimate: the map is the one written out by hand on the keys given (not the
    patches), the feature the map fusion of the patches with that map, and map_pool's pool the map's
    mix of the patches; a module is refused the wrong inputs."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map",
                                penultimate_keys=True)
    randomise_biases(mim)
    plain = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map")
    plain.load_state_dict(mim.state_dict(), strict=False)
    query, patches, keys, v = torch.randn(3, 1, 32), torch.randn(3, 10, 32), torch.randn(3, 10, 32), torch.randn(3, 32)
    with torch.no_grad():
        expected = reference_map(mim, query, keys)
        torch.testing.assert_close(mim.cross_attention_weights(query, patches, v, map_keys=keys)[0][:, 0, 0], expected,
                                   rtol=1e-5, atol=1e-7)
        feat = mim(query, patches, 0, v, map_keys=keys)
        torch.testing.assert_close(feat, reference_map_fusion(mim, expected, patches, v), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mim(query, patches, 0, v, map_keys=patches), plain(query, patches, 0, v),
                                   rtol=0, atol=0)
        assert not torch.allclose(feat, plain(query, patches, 0, v), atol=1e-3)
    mim.train()
    keys.requires_grad_()
    _, pool = mim(query, patches, 0, v, with_map_pool=True, map_keys=keys)
    torch.testing.assert_close(pool, torch.einsum("bm,bme->be", expected, patches), rtol=1e-5, atol=1e-6)
    pool.square().sum().backward()
    assert keys.grad is None                          # the pool's loss trains the map's own parameters only
    with pytest.raises(ValueError, match="needs map_keys"):
        mim(query, patches, 0, v)
    with pytest.raises(ValueError, match="was given map_keys"):
        plain(query, patches, 0, v, map_keys=keys)
    with pytest.raises(ValueError, match="no map"):
        MultimodalInteraction(32, heads=4, fusion="attention", penultimate_keys=True)


def feature_with_penultimate_keys(model):
    """The test feature of ``batch()`` after randomising the MIM's biases, the encoder's outputs (with
    its CLS attention), the keys ln_post(x_{L-1}) proj written out from the last block's input
    x_{L-1} (taken by a hook) and the simplified prompt's l_p."""
    randomise_biases(model.heads.mim)
    visual_tower = model.backbone.visual
    seen = {}
    hook = visual_tower.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    inputs = batch()
    with torch.no_grad():
        feat = model(inputs)
        hook.remove()
        visual = model.backbone(model.preprocess_image(inputs), with_tokens=True, with_cls_attention=True)
        keys = visual_tower.ln_post(seen["x"][:, 1:]) @ visual_tower.proj
        return feat, visual, keys, model.text.simple(len(feat), feat.device)


def test_a_model_with_penultimate_keys_maps_the_patch_tokens_before_the_last_block():
    """End to end (MODEL.PROMPTSG.MIM.MAP_KEYS penultimate): the simplified prompt's map is made from
    ln_post(x_{L-1}) proj of the patches, x_{L-1} the last block's input taken by a hook, and the
    feature from the final patch tokens with that map."""
    model = build_model(tiny_cfg(**{"MODEL.PROMPTSG.MIM.MAP_KEYS": "penultimate"})).eval()
    assert model.heads.needs_penultimate_tokens and not model.heads.needs_cls_attention
    feat, visual, keys, l_p = feature_with_penultimate_keys(model)
    with torch.no_grad():
        expected = reference_map_fusion(model.heads.mim, reference_map(model.heads.mim, l_p[:, None], keys),
                                        visual.tokens, visual.embedding)
    assert not torch.allclose(keys, visual.tokens, atol=1e-3)
    torch.testing.assert_close(feat, expected, rtol=1e-4, atol=1e-5)


def test_the_default_map_weighs_the_penultimate_keys_map_by_the_squared_cls_attention():
    """End to end, Base-PromptSG.yml's wiring (MAP_KEYS penultimate, MAP_PRIOR cls_attention,
    MAP_PRIOR_POWER 2): the simplified prompt's map is softmax(2 z) over the keys ln_post(x_{L-1})
    proj, times c^2, c the last block's CLS attention, renormalised; the feature is the map fusion of
    the final patch tokens with that map."""
    cfg = tiny_cfg(default_map=True)
    assert (cfg.MODEL.PROMPTSG.MIM.MAP_KEYS, cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR,
            cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER) == ("penultimate", "cls_attention", 2.0)
    model = build_model(cfg).eval()
    assert model.heads.needs_penultimate_tokens and model.heads.needs_cls_attention
    assert model.heads.mim.map_scales.tolist() == [2.0, 2.0]
    feat, visual, keys, l_p = feature_with_penultimate_keys(model)
    with torch.no_grad():
        a = reference_map(model.heads.mim, l_p[:, None], keys) * visual.log_cls_attention.exp() ** 2
        expected = reference_map_fusion(model.heads.mim, a / a.sum(dim=1, keepdim=True), visual.tokens,
                                        visual.embedding)
    torch.testing.assert_close(feat, expected, rtol=1e-4, atol=1e-5)


def reference_map_fusion_states(mim, block, x, bias):
    """One block of ``reference_map_fusion`` on the states x (B, 1 + M, E), the bias on v's row only."""
    full = torch.zeros(x.shape[0], x.shape[1], x.shape[1])
    full[:, 0] = bias
    attn, normed = block.attn, block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = normed @ w_q.T + b_q, normed @ w_k.T + b_k, normed @ w_v.T + b_v
    d = q.shape[-1] // attn.num_heads
    heads = [((q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2)) / math.sqrt(d) + full)
             .softmax(dim=-1) @ v[..., h * d:(h + 1) * d] for h in range(attn.num_heads)]
    x = x + attn.out_proj(torch.cat(heads, dim=-1))
    return x + block.mlp(block.ln_2(x))


def test_map_pool_is_the_maps_mix_of_the_patches_and_trains_the_map_only():
    """MODEL.LOSSES.SUPCON.MAP_SCALE's pool: sum_m a_m p_m with the forward's map a, the feature
    unchanged beside it; a loss on it reaches the map's parameters, never the patches, the query or
    the blocks."""
    torch.manual_seed(0)
    mim = MultimodalInteraction(32, heads=4, cross_layers=1, self_layers=2, fusion="learned_map").train()
    randomise_biases(mim)
    query = torch.randn(3, 1, 32, requires_grad=True)
    patches = torch.randn(3, 10, 32, requires_grad=True)
    v = torch.randn(3, 32)
    feat, pool = mim(query, patches, 0, v, with_map_pool=True)
    with torch.no_grad():
        torch.testing.assert_close(pool, torch.einsum("bm,bme->be", reference_map(mim, query, patches), patches),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feat, mim(query, patches, 0, v), rtol=0, atol=0)
    pool.square().sum().backward()
    assert query.grad is None and patches.grad is None
    assert all(p.grad is None for p in mim.blocks.parameters())
    assert mim.cross[0].q_proj.weight.grad.abs().sum() > 0 and mim.cross[0].k_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no map"):
        MultimodalInteraction(32, heads=4, fusion="attention")(query, patches, 0, v, with_map_pool=True)


def test_the_map_pool_loss_is_supcon_between_the_pool_and_the_prompt():
    """With MODEL.LOSSES.SUPCON.MAP_SCALE, the losses add scale x L_SupCon(pool, l_p) (Eq. 4-6 by
    loops) beside the paper's terms, which stay as they were."""
    cfg = tiny_cfg(**{"MODEL.LOSSES.SUPCON.TEMPERATURE": TAU, "MODEL.LOSSES.SUPCON.MAP_SCALE": 0.25})
    model = build_model(cfg).train()
    inputs = batch()
    y = inputs["targets"]
    losses, visual = run_capturing_visual(model, inputs)
    with torch.no_grad():
        l_p = model.text.compose(model.heads.inversion(visual.embedding))
        a = reference_map(model.heads.mim, l_p[:, None], visual.tokens)
        pool = torch.einsum("bm,bme->be", a, visual.tokens)
    assert set(losses) == {"loss_cls", "loss_triplet", "loss_triplet_visual", "loss_supcon", "loss_supcon_map"}
    assert float(losses["loss_supcon_map"].detach()) == pytest.approx(
        0.25 * 2 * float(supcon_by_loops(pool, l_p, y)), rel=1e-5)
    assert float(losses["loss_supcon"].detach()) == pytest.approx(float(supcon_by_loops(visual.embedding, l_p, y)),
                                                                  rel=1e-5)
