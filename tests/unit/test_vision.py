"""Vision encoder and connector against a plain-PyTorch reference, 2D RoPE against
transformers' Qwen2-VL, image isolation, bad inputs and meta-device parameter counts.

The reference is written from the model description (NAVIL.md "Architecture" and "The released
code's exact behaviour", 1), not from the module: official weight names and layouts (Conv2d
patch embedding ``[W, 3, 16, 16]``, qkv rows ``[q; k; v]``), one image/scale at a time,
explicit softmax with a window mask instead of the module's segments, pixel shuffle from a
raster feature map built from the positions, the output order a sort of the merge units by
(window row, window column, unit row, unit column) instead of the module's gather, all in
float64. Tolerance 1e-5 relative to the largest reference value: the module runs in float32
(~6e-8 relative rounding per operation) through two blocks of sums over at most 768 terms, so
its error against the exact value stays orders of magnitude below 1e-5 (measured <= 4.2e-7),
while any layout or ordering mistake changes outputs by O(1).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)

from megatron_navil.config.model import VisionConfig
from megatron_navil.config.params import param_counts
from megatron_navil.config.registry import get_config
from megatron_navil.models.connector import Connector, pixel_shuffle
from megatron_navil.models.meta import meta_param_counts
from megatron_navil.models.rope import apply_vision_rope, vision_rope_cos_sin
from megatron_navil.models.tp import standalone_linear_config
from megatron_navil.models.vision import VisionEncoder, tp_size_for
from megatron_navil.ops import patch_positions, vision_kwargs
from megatron_navil.parallel.spawn import free_port

TOL = 1e-5
GRIDS = [(8, 12), (4, 4), (2, 6), (6, 4)]  # two images, each with a second (smaller) scale
# Window order of 2x2 merge units with attention inside windows except in block 1; the tiny
# config's default order (windows of 4x4 units, every block global: GRIDS[0] is 6 units wide,
# so it is permuted); and raster order.
WINDOWED = VisionConfig(
    depth=3, width=32, mlp=64, heads=2, window_size=4, fullatt_block_indexes=(1,)
)
RASTER = VisionConfig(depth=2, width=32, mlp=64, heads=2, window_size=None)
CONFIGS = [get_config("tiny").vision, WINDOWED, RASTER]
IDS = ["window-order", "window-attention", "raster"]


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group in this process (mcore's linears need a group object)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(
            "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}"
        )
    yield torch.distributed.new_group([0])
    if owns:
        torch.distributed.destroy_process_group()


def _build(cfg: VisionConfig, group, seed: int = 0):
    torch.manual_seed(seed)
    config = standalone_linear_config()
    enc = VisionEncoder(cfg, config, group)
    con = Connector(cfg.width, 48, config, group, merge=2, norm_eps=1e-5)
    with torch.no_grad():  # non-trivial norms and layer scales (init is 1 and 0.1)
        for name, p in [*enc.named_parameters(), *con.named_parameters()]:
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ls1", "ls2")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.startswith("0."):
                p.copy_(torch.randn_like(p) * 0.3 + (1 if name == "0.weight" else 0))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return enc, con


class Pack:
    """The encoder's inputs besides the patches (``ops.vision_kwargs``)."""

    def __init__(self, grids, cfg: VisionConfig, merge: int = 2) -> None:
        kw = vision_kwargs(grids, merge, cfg.window_units(merge))
        self.positions, self.cu_seqlens = kw["patch_positions"], kw["vision_cu_seqlens"]
        self.window = (kw.get("vision_window_index"), kw.get("vision_window_cu_seqlens"))


def _inputs(cfg: VisionConfig, grids=GRIDS, seed: int = 1):
    pack = Pack(grids, cfg)
    t = int(pack.cu_seqlens[-1])
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, 3 * 16 * 16, generator=gen), pack


# ----------------------------------------------------------------------------- reference


def to_official(enc: VisionEncoder, con: Connector, heads: int) -> dict[str, torch.Tensor]:
    """Our state dict in the official HF names and layouts (float64)."""
    out = {}
    for name, p in enc.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        p = p.double()
        if name == "embeddings.patch_embedding.weight":
            p = p.reshape(p.shape[0], 3, 16, 16)
        elif name.endswith("attn.qkv.weight"):
            w = p.shape[1]
            p = p.view(heads, 3, w // heads, w).transpose(0, 1).reshape(3 * w, w)
        out[f"vision_model.{name}"] = p
    for name, p in con.state_dict().items():
        if not name.endswith("_extra_state"):
            out[f"mlp1.{name}"] = p.double()
    return out


def _rms(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hf_rope(positions: torch.Tensor, cfg: VisionConfig):
    hf_cfg = Qwen2VLVisionConfig(
        embed_dim=cfg.width,
        num_heads=cfg.heads,
        rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta},
    )
    return Qwen2VLVisionRotaryEmbedding(hf_cfg)(torch.zeros(1), positions)


def window_sort(pos: torch.Tensor, cfg: VisionConfig, merge: int = 2) -> torch.Tensor:
    """Section 1's order of one image/scale's patches (``pos`` ``[n, 2]``, any order): a
    stable sort by (window row, window column, unit row, unit column, row and column inside
    the unit), windows of ``window_size / merge`` units a side; raster units without one."""
    side = cfg.window_units(merge) or 1 << 30
    r, c = pos[:, 0].tolist(), pos[:, 1].tolist()
    keys = [
        (ur // side, uc // side, ur, uc, a % merge, b % merge)
        for a, b in zip(r, c, strict=True)
        for ur, uc in [(a // merge, b // merge)]
    ]
    return torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))


def reference(sd, cfg: VisionConfig, patches, positions, bounds, merge=2):
    """Per image/scale: Conv2d embed, blocks with explicit masked softmax (windows of
    ``window_size`` patches where ``fullatt_block_indexes`` leaves a block out), features and
    tokens in :func:`window_sort` order (pixel shuffle from the raster map), LayerNorm ->
    Linear -> GELU -> Linear. Returns (features, tokens)."""
    w, heads, hd, eps = cfg.width, cfg.heads, cfg.head_dim, cfg.norm_eps
    feats, tokens = [], []
    for s, e in itertools.pairwise(bounds):
        pos = positions[s:e]
        n = e - s
        emb = "vision_model.embeddings.patch_embedding."
        x = F.conv2d(patches[s:e].double().view(n, 3, 16, 16), sd[emb + "weight"], sd[emb + "bias"])
        x = x.view(n, w)
        cos, sin = (c.double() for c in _hf_rope(pos, cfg))
        side = cfg.window_size or 1
        win = (pos[:, 0] // side) * 100000 + pos[:, 1] // side
        for i in range(cfg.depth):
            p = f"vision_model.encoder.layers.{i}."
            full = cfg.fullatt_block_indexes is None or i in cfg.fullatt_block_indexes
            allowed = torch.ones(n, n, dtype=torch.bool) if full else win[:, None] == win[None]
            h = _rms(x, sd[p + "norm1.weight"], eps)
            q, k, v = (h @ sd[p + "attn.qkv.weight"].T).split(w, dim=-1)
            q = _rms(q, sd[p + "attn.q_norm.weight"], eps).view(n, heads, hd)
            k = _rms(k, sd[p + "attn.k_norm.weight"], eps).view(n, heads, hd)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", attn, v.view(n, heads, hd)).reshape(n, w)
            x = x + sd[p + "ls1"] * (o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
            h = _rms(x, sd[p + "norm2.weight"], eps)
            h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
            x = x + sd[p + "ls2"] * (h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
        order = window_sort(pos, cfg, merge)
        feats.append(x[order])
        # Pixel shuffle: raster feature map, then each 2x2 unit's [p00, p01, p10, p11], the
        # units in the order their first patch has in `order`.
        gh, gw = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        fmap = torch.empty(gh, gw, w, dtype=x.dtype)
        fmap[pos[:, 0], pos[:, 1]] = x
        for r, c in pos[order][:: merge * merge].tolist():
            ur, uc = r // merge, c // merge
            unit = fmap[ur * merge : (ur + 1) * merge, uc * merge : (uc + 1) * merge]
            tokens.append(unit.reshape(-1))
    m = torch.stack(tokens)
    m = F.layer_norm(m, (m.shape[1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], eps=1e-5)
    m = F.gelu(m @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"])
    return torch.cat(feats), m @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_reference(group, cfg):
    enc, con = _build(cfg, group)
    patches, pack = _inputs(cfg)
    feats = enc(patches, pack.positions, pack.cu_seqlens, *pack.window)
    tokens = con(feats)
    ref_feats, ref_tokens = reference(
        to_official(enc, con, cfg.heads), cfg, patches, pack.positions, pack.cu_seqlens.tolist()
    )
    assert tokens.shape == (patches.shape[0] // 4, 48)
    assert _rel(feats, ref_feats) < TOL
    assert _rel(tokens, ref_tokens) < TOL
    # The check can fail: a qkv layout mistake (official [q; k; v] read as per-head) shows.
    wrong = to_official(enc, con, cfg.heads)
    key = "vision_model.encoder.layers.0.attn.qkv.weight"
    wrong[key] = enc.encoder["layers"][0].attn.qkv.weight.double()
    bad, _ = reference(wrong, cfg, patches, pack.positions, pack.cu_seqlens.tolist())
    assert _rel(feats, bad) > 1e3 * TOL
    # ... and so does the token order: the reference in raster order differs by O(1).
    if cfg.window_size is not None:
        raster = dataclasses.replace(cfg, window_size=None, fullatt_block_indexes=None)
        if cfg.fullatt_block_indexes is None:  # same attention, other order
            _, raster_tokens = reference(
                to_official(enc, con, cfg.heads), raster, patches, pack.positions,
                pack.cu_seqlens.tolist(),
            )  # fmt: skip
            assert _rel(tokens, raster_tokens) > 1e3 * TOL


def test_window_attention_changes_the_output(group):
    """Windows are really used: the same weights with every block global give other
    features (in the same order)."""
    enc, _ = _build(WINDOWED, group)
    global_cfg = dataclasses.replace(WINDOWED, fullatt_block_indexes=None)
    full_enc, _ = _build(global_cfg, group)
    for a, b in zip(enc.parameters(), full_enc.parameters(), strict=True):
        assert torch.equal(a, b)
    patches, pack = _inputs(WINDOWED)
    windowed = enc(patches, pack.positions, pack.cu_seqlens, *pack.window)
    full = full_enc(patches, pack.positions, pack.cu_seqlens, *pack.window)
    assert (windowed - full).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_images_and_scales_are_isolated(group, cfg):
    enc, con = _build(cfg, group)
    patches, pack = _inputs(cfg)
    base = enc(patches, pack.positions, pack.cu_seqlens, *pack.window)
    bounds = pack.cu_seqlens.tolist()
    s, e = bounds[1], bounds[2]  # the first image's second scale
    changed = patches.clone()
    changed[s:e] += torch.randn(e - s, changed.shape[1])
    out = enc(changed, pack.positions, pack.cu_seqlens, *pack.window)
    assert not torch.equal(out[s:e], base[s:e])
    assert torch.equal(out[:s], base[:s]) and torch.equal(out[e:], base[e:])
    tokens, base_tokens = con(out), con(base)
    assert torch.equal(tokens[: s // 4], base_tokens[: s // 4])
    assert torch.equal(tokens[e // 4 :], base_tokens[e // 4 :])


@pytest.mark.parametrize(("head_dim", "theta"), [(64, 10000.0), (16, 10000.0), (32, 500.0)])
def test_rope_matches_qwen2_vl(head_dim, theta):
    cfg = VisionConfig(depth=1, width=head_dim * 3, mlp=8, heads=3, rope_theta=theta)
    positions = patch_positions([(6, 10), (4, 2), (96, 64)])
    cos, sin = vision_rope_cos_sin(positions, head_dim, theta)
    hf_cos, hf_sin = _hf_rope(positions, cfg)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    q, k = torch.randn(2, positions.shape[0], 3, head_dim).unbind(0)
    hf_q, hf_k = apply_rotary_pos_emb_vision(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_vision_rope(q, cos, sin), hf_q)
    assert torch.equal(apply_vision_rope(k, cos, sin), hf_k)
    # Rows and columns both matter: swapping them changes the angles.
    assert not torch.equal(vision_rope_cos_sin(positions.flip(1), head_dim, theta)[0], cos)


def test_pixel_shuffle_order_by_hand():
    # A 2 x 4 patch grid: patchify emits unit (0,0) = patches (0,0) (0,1) (1,0) (1,1), then
    # unit (0,1) = (0,2) (0,3) (1,2) (1,3). Feature of a patch = 10 * row + col.
    positions = patch_positions([(2, 4)])
    x = (10 * positions[:, 0] + positions[:, 1]).float().unsqueeze(1)  # [8, 1]
    assert pixel_shuffle(x).tolist() == [[0.0, 1.0, 10.0, 11.0], [2.0, 3.0, 12.0, 13.0]]
    x2 = torch.arange(16.0).view(8, 2)  # W = 2: each patch's features stay together
    assert pixel_shuffle(x2)[1].tolist() == [8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]


def test_bad_inputs(group):
    cfg = get_config("tiny").vision
    enc, con = _build(cfg, group)
    patches, pack = _inputs(cfg)
    t = patches.shape[0]
    with pytest.raises(ValueError, match="multiple of merge\\^2=4"):
        con(torch.randn(t - 2, cfg.width))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the packed length"):
        enc(patches, pack.positions, pack.cu_seqlens[:-1])
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        enc(patches[:-4], pack.positions[:-4], pack.cu_seqlens)
    with pytest.raises(ValueError, match="patches_td must be \\[t, 3\\*16\\*16=768\\]"):
        enc(patches[:, :-1], pack.positions, pack.cu_seqlens)
    with pytest.raises(ValueError, match=r"positions must be an integer \[t=\d+, 2\]"):
        enc(patches, pack.positions[:, :1], pack.cu_seqlens)
    with pytest.raises(ValueError, match="positions must be an integer"):
        enc(patches, pack.positions.float(), pack.cu_seqlens)
    with pytest.raises(
        ValueError, match=re.escape("vision_window_index missing but VisionConfig.window_size=8")
    ):
        enc(patches, pack.positions, pack.cu_seqlens)
    renc, _ = _build(RASTER, group)
    with pytest.raises(ValueError, match=r"vision_window_index given but .*window_size=None"):
        renc(patches, pack.positions, pack.cu_seqlens, *pack.window)
    with pytest.raises(ValueError, match=r"vision_window_index must be \[t="):
        enc(patches, pack.positions, pack.cu_seqlens, pack.window[0][:-1])
    wenc, _ = _build(WINDOWED, group)
    with pytest.raises(ValueError, match="windowed blocks need vision_window_cu_seqlens"):
        wenc(patches, pack.positions, pack.cu_seqlens, pack.window[0])
    with pytest.raises(ValueError, match="heads=2 do not split over a TP group of 4"):
        VisionEncoder(cfg, standalone_linear_config(), _FakeGroup(4))
    with pytest.raises(ValueError, match="tp_group is None; pass the process group explicitly"):
        VisionEncoder(cfg, standalone_linear_config(), None)


class _FakeGroup:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def test_tp_size_for():
    assert tp_size_for(get_config("navil-2b").vision, 2) == 1  # 23 heads
    assert tp_size_for(get_config("navil-9b").vision, 2) == 2
    assert tp_size_for(get_config("navil-9b").vision, 8) == 1  # 28 heads


@pytest.mark.parametrize(
    ("name", "vision", "connector"),
    [("navil-2b", 626e6, 16e6), ("navil-9b", 1.24e9, 46e6)],
)
def test_meta_device_counts(name, vision, connector):
    cfg = get_config(name)
    counts = meta_param_counts(cfg)  # raises if any parameter was allocated off meta
    expected = param_counts(cfg)
    assert counts == {"vision": expected["vision"], "connector": expected["connector"]}
    assert abs(counts["vision"] / vision - 1) < 0.01
    assert abs(counts["connector"] / connector - 1) < 0.02
