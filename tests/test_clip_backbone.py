"""CLIPVisualBackbone against open_clip's own forward and hand-written computations."""
import copy
import math

import promptsg  # noqa: F401  (patches FastReID, registers the backbone)

import pytest
import torch
from fastreid.config import get_cfg
from fastreid.modeling.backbones import BACKBONE_REGISTRY

from promptsg.modeling.clip_backbone import CLIPVisualBackbone
from promptsg.modeling.clip_weights import create_clip_model
from promptsg.config import add_promptsg_config

TIGHT = dict(rtol=1e-6, atol=1e-6)


def _images(height=224, width=224, batch=2, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _model(name, image_size=(224, 224), seed=0):
    torch.manual_seed(seed)
    model = create_clip_model(name, "", image_size)
    for module in model.modules():  # non-trivial BatchNorm statistics for the RN tower
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


# ---- native resolution: same numbers as open_clip ----

@pytest.mark.parametrize("name", ["tiny-ViT", "tiny-RN"])
def test_embedding_equals_open_clip_encode_image(name):
    model = _model(name)
    backbone = CLIPVisualBackbone(model.visual, image_size=(224, 224)).eval()
    with torch.no_grad():
        out = backbone(_images())
        torch.testing.assert_close(out.embedding, model.encode_image(_images()), **TIGHT)
    assert backbone.out_dim == 64


def test_vit_tokens_and_states_equal_open_clip_intermediates():
    model = _model("tiny-ViT")
    visual = model.visual
    backbone = CLIPVisualBackbone(visual, image_size=(224, 224)).eval()
    with torch.no_grad():
        out = backbone(_images())
        last = visual.forward_intermediates(
            _images(), indices=[2], normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True)
        prev = visual.forward_intermediates(
            _images(), indices=[1], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
    patches = last["image_intermediates"][0]  # (B, 196, C), ln_post applied
    assert out.tokens.shape == (2, 196, 64)
    torch.testing.assert_close(out.tokens, patches @ visual.proj, **TIGHT)
    torch.testing.assert_close(out.tokens[:, 37], patches[:, 37] @ visual.proj, **TIGHT)
    x11, x12, proj = out.states
    torch.testing.assert_close(x11, prev["image_intermediates_prefix"][0][:, 0], **TIGHT)
    torch.testing.assert_close(x12, last["image_intermediates_prefix"][0][:, 0], **TIGHT)
    assert backbone.width == 64 and x11.shape == x12.shape == (2, 64)
    assert proj is out.embedding


def test_cls_attention_is_pytorchs_head_mean_weights_of_the_last_block_on_the_patches():
    """MIM.MAP_PRIOR's c: the last block's CLS row of nn.MultiheadAttention's own head-averaged
    weights (need_weights=True) on that block's input, renormalised over the patches; asking for it
    changes no other output."""
    model = _model("tiny-ViT")
    backbone = CLIPVisualBackbone(model.visual, image_size=(64, 32), stride=12).eval()
    last = model.visual.transformer.resblocks[-1]
    seen = {}
    hook = last.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = backbone(_images(64, 32, batch=3), with_cls_attention=True)
        hook.remove()
        plain = backbone(_images(64, 32, batch=3))
        normed = last.ln_1(seen["x"])
        weights = last.attn(normed, normed, normed, need_weights=True, average_attn_weights=True)[1]   # (B, N, N)
    expected = weights[:, 0, 1:] / weights[:, 0, 1:].sum(dim=-1, keepdim=True)
    assert out.log_cls_attention.shape == (3, expected.shape[1]) and plain.log_cls_attention is None
    torch.testing.assert_close(out.log_cls_attention.exp(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.tokens, plain.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.embedding, plain.embedding, rtol=0, atol=0)
    picked = out.rows(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.log_cls_attention, out.log_cls_attention[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(picked.tokens, out.tokens[[2, 0]], rtol=0, atol=0)


def test_penultimate_tokens_are_the_last_blocks_input_patches_in_the_joint_space():
    """MIM.MAP_KEYS's keys: ln_post(x_{L-1}) proj of the patches, x_{L-1} the last block's input
    (taken by a hook); asking for them changes no other output; a ModifiedResNet has none."""
    model = _model("tiny-ViT")
    backbone = CLIPVisualBackbone(model.visual, image_size=(64, 32), stride=12).eval()
    seen = {}
    hook = model.visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = backbone(_images(64, 32, batch=3), with_penultimate_tokens=True)
        hook.remove()
        plain = backbone(_images(64, 32, batch=3))
        expected = model.visual.ln_post(seen["x"][:, 1:]) @ model.visual.proj
    assert plain.penultimate_tokens is None and out.penultimate_tokens.shape == out.tokens.shape
    torch.testing.assert_close(out.penultimate_tokens, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.penultimate_tokens, out.tokens, atol=1e-3)
    torch.testing.assert_close(out.tokens, plain.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.embedding, plain.embedding, rtol=0, atol=0)
    torch.testing.assert_close(out.rows(torch.tensor([1])).penultimate_tokens, out.penultimate_tokens[[1]],
                               rtol=0, atol=0)
    resnet = CLIPVisualBackbone(_model("tiny-RN").visual, image_size=(64, 32))
    with pytest.raises(ValueError, match="with_penultimate_tokens needs a ViT"):
        resnet(_images(64, 32), with_penultimate_tokens=True)


def test_cls_attention_needs_a_vit():
    backbone = CLIPVisualBackbone(_model("tiny-RN").visual, image_size=(224, 224)).eval()
    with pytest.raises(ValueError, match="with_cls_attention needs a ViT"):
        backbone(_images(), with_cls_attention=True)


def test_resnet_tokens_are_attnpool_queried_at_every_position():
    model = _model("tiny-RN")
    visual = model.visual
    backbone = CLIPVisualBackbone(visual, image_size=(224, 224)).eval()
    with torch.no_grad():
        out = backbone(_images())
        feats = visual.forward_intermediates(_images(), indices=[3, 4], intermediates_only=True)
    layer3, layer4 = feats["image_intermediates"]
    pool = visual.attnpool
    # hand-written attention pool: keys/values = [mean, positions] + pos. embedding
    x = layer4.flatten(2).transpose(1, 2)  # (B, 49, C)
    x = torch.cat([x.mean(1, keepdim=True), x], dim=1) + pool.positional_embedding  # (B, 50, C)
    heads, width = pool.num_heads, x.shape[-1]
    split = lambda t: t.reshape(2, 50, heads, width // heads).transpose(1, 2)  # (B, h, 50, d)
    q, k, v = (split(lin(x)) for lin in (pool.q_proj, pool.k_proj, pool.v_proj))
    attn = (q @ k.transpose(-1, -2) / (width // heads) ** 0.5).softmax(-1)
    expected = pool.c_proj((attn @ v).transpose(1, 2).reshape(2, 50, width))  # (B, 50, E)
    assert out.tokens.shape == (2, 49, 64)
    torch.testing.assert_close(out.tokens, expected[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.embedding, expected[:, 0], rtol=1e-5, atol=1e-5)
    gap3, gap4, proj = out.states
    torch.testing.assert_close(gap3, layer3.mean((2, 3)), **TIGHT)
    torch.testing.assert_close(gap4, layer4.mean((2, 3)), **TIGHT)
    assert backbone.width == 512 and gap4.shape == (2, 512) and proj is out.embedding


# ---- re-ID resolution and overlapping patches ----

@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10))])
def test_vit_at_256x128_resizes_position_grid_for_stride(stride, grid):
    model = _model("tiny-ViT")  # built at 224: 14x14 grid
    native = model.visual.positional_embedding.detach().clone()
    backbone = CLIPVisualBackbone(model.visual, image_size=(256, 128), stride=stride)
    num_tokens = grid[0] * grid[1]
    assert backbone.visual.positional_embedding.shape == (1 + num_tokens, 64)
    assert torch.equal(backbone.visual.positional_embedding[0], native[0])
    assert backbone.visual.conv1.stride == (stride, stride)
    out = backbone(_images(256, 128))
    assert out.tokens.shape == (2, num_tokens, 64) and out.embedding.shape == (2, 64)


def test_resnet_at_256x128_resizes_attnpool_grid():
    model = _model("tiny-RN")
    backbone = CLIPVisualBackbone(model.visual, image_size=(256, 128))
    assert backbone.visual.attnpool.positional_embedding.shape == (1 + 8 * 4, 512)
    out = backbone(_images(256, 128))
    assert out.tokens.shape == (2, 32, 64) and out.embedding.shape == (2, 64)


# ---- SIE ----

def _sie_backbone(model, sie_coe=1.0):
    backbone = CLIPVisualBackbone(model.visual, image_size=(224, 224), num_cameras=3, sie_coe=sie_coe).eval()
    with torch.no_grad():
        backbone.sie_embed.copy_(torch.randn(3, 64, generator=torch.Generator().manual_seed(5)))
    return backbone


@pytest.mark.parametrize("sie_coe", [1.0, 0.5])
def test_sie_equals_shifting_the_cls_token_by_the_camera_embedding(sie_coe):
    model = _model("tiny-ViT")
    reference = copy.deepcopy(model)  # open_clip model, CLS shifted by hand below
    backbone = _sie_backbone(model, sie_coe)
    camids = torch.tensor([2, 0])
    with torch.no_grad():
        out = backbone(_images(), camids).embedding
        no_sie = CLIPVisualBackbone(copy.deepcopy(reference.visual), image_size=(224, 224)).eval()
        plain = no_sie(_images()).embedding
        for i, cam in enumerate(camids.tolist()):
            shifted = copy.deepcopy(reference)
            shifted.visual.class_embedding += sie_coe * backbone.sie_embed[cam]
            torch.testing.assert_close(out[i], shifted.encode_image(_images()[i:i + 1])[0], **TIGHT)
    assert not torch.allclose(out, plain)


def test_sie_output_depends_on_camera_id():
    backbone = _sie_backbone(_model("tiny-ViT"))
    with torch.no_grad():
        cam0 = backbone(_images(), torch.tensor([0, 0])).embedding
        cam1 = backbone(_images(), torch.tensor([1, 1])).embedding
    assert not torch.allclose(cam0, cam1)


def test_sie_embedding_gets_gradients():
    backbone = _sie_backbone(_model("tiny-ViT")).train()
    backbone(_images(), torch.tensor([0, 2])).embedding.sum().backward()
    assert backbone.sie_embed.grad[1].abs().sum() == 0 and backbone.sie_embed.grad[0].abs().sum() > 0


def test_sie_init_is_normal_std_002_truncated_at_2_std():
    torch.manual_seed(0)
    backbone = CLIPVisualBackbone(_model("tiny-ViT").visual, image_size=(224, 224), num_cameras=500)
    assert backbone.sie_embed.shape == (500, 64)
    # std of N(0, 1) cut to [-2, 2]: sqrt(1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2)))
    pdf2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    truncated_std = 0.02 * math.sqrt(1 - 4 * pdf2 / math.erf(2 / math.sqrt(2)))
    assert abs(backbone.sie_embed.std().item() - truncated_std) < 0.0005
    assert backbone.sie_embed.abs().max() <= 0.04


def test_sie_needs_camids_and_a_vit():
    backbone = _sie_backbone(_model("tiny-ViT"))
    with pytest.raises(ValueError, match="camids"):
        backbone(_images())
    with pytest.raises(ValueError, match="ViT"):
        CLIPVisualBackbone(_model("tiny-RN").visual, image_size=(224, 224), num_cameras=2)


# ---- FastReID registry ----

def _cfg(**clip):
    cfg = get_cfg()
    add_promptsg_config(cfg)
    cfg.MODEL.CLIP.NAME = "tiny-ViT"
    cfg.INPUT.SIZE_TRAIN = [256, 128]
    for key, value in clip.items():
        cfg.MODEL.CLIP[key] = value
    return cfg


def test_registry_builds_backbone_working_at_size_train():
    backbone = BACKBONE_REGISTRY.get("build_clip_backbone")(_cfg(STRIDE=12))
    out = backbone(_images(256, 128))
    assert out.tokens.shape == (2, 21 * 10, 64) and backbone.sie_embed is None


def test_registry_wraps_given_clip_model_with_sie():
    clip_model = create_clip_model("tiny-ViT", "", (256, 128))
    backbone = BACKBONE_REGISTRY.get("build_clip_backbone")(
        _cfg(SIE_CAMERA=True, NUM_CAMERAS=6, SIE_COE=3.0), clip_model)
    assert backbone.visual is clip_model.visual
    assert backbone.sie_embed.shape == (6, 64) and backbone.sie_coe == 3.0
    assert backbone(_images(256, 128), torch.tensor([5, 0])).tokens.shape == (2, 128, 64)


def test_registry_sie_without_camera_count_raises():
    with pytest.raises(ValueError, match="NUM_CAMERAS"):
        BACKBONE_REGISTRY.get("build_clip_backbone")(_cfg(SIE_CAMERA=True))
