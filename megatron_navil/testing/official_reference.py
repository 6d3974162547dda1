"""An independent reference of the *released* NaViL model, for compatibility tests and reports.

Written from ../shared/NAVIL.md alone ("Official HF release format" and "The released code's
exact behaviour", 1-7), not from this project's model or its HF remote code, and in the
released code's style rather than ours: a Conv2d patch embedding on ``[n, 3, 16, 16]`` pixel
values, the window index built by padding every merged grid with a whole extra window (the
Qwen2.5-VL construction), the modality experts computed on *all* tokens and picked by a mask,
InternLM2's visual attention output through ``wo`` and then ``wo_ve``, everything in float64.
It is a reference, not a model: one sequence at a time, no cache, no batching.

What it gives:

* :func:`check_config`: the problems the released code would have with a ``config.json``
  (a wrong ``llm_config.architectures``, a missing official field), as strings;
* :func:`expected_tensors`: every tensor the released model class holds for a config (names
  and shapes; InternLM2's ``bias`` defaults to true, adding four bias tensors a layer);
* :func:`load`: a directory's safetensors against those, with the missing and unexpected
  names (what ``from_pretrained`` would report);
* :func:`preprocess`: an image's ``pixel_values`` ``[n, 3, p, p]`` and ``image_grid_thw`` the
  way the released demo makes them (sections 2-3; the chain's budget computed with torch
  tensors as the demo does, transformers' Qwen2-VL ``smart_resize`` with factor 1);
* :func:`prompt`: the query text of the released ``chat`` (section 4) with the image blocks;
* :class:`Reference`: ``logits(input_ids, pixel_values, image_grid_thw)`` ``[T, V]`` float64,
  special-token ids taken from the tokenizer (section 5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SPECIAL_TOKEN_LIST = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
LLM_ARCHITECTURES = ("InternLM2VEForCausalLM", "Qwen3VEForCausalLM")
TOP_LEVEL_FIELDS = (
    "template", "downsample_ratio", "min_dynamic_patch", "max_dynamic_patch",
    "scale_downsample_ratio", "anyres_image_size", "force_image_size", "pad2square",
    "ps_version", "select_layer", "use_backbone_lora", "use_llm_lora",
)  # fmt: skip
VISION_FIELDS = (
    "patch_size", "image_size", "qkv_bias", "qk_normalization", "norm_type", "hidden_act",
    "initializer_factor", "use_flash_attn", "drop_path_rate", "window_size",
    "fullatt_block_indexes", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "layer_norm_eps", "downsample_ratio",
)  # fmt: skip
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "  # noqa: RUF001
    "是一个有用无害的人工智能助手。"
)


# ------------------------------------------------------------------------------------------
# config and weights


def check_config(config: dict[str, Any]) -> list[str]:
    """What the released code would refuse or lack in ``config`` (empty when it loads)."""
    problems = []
    if config.get("model_type") != "navil_chat":
        problems.append(f"model_type={config.get('model_type')!r}, not 'navil_chat'")
    arch = (config.get("llm_config", {}).get("architectures") or [None])[0]
    if arch not in LLM_ARCHITECTURES:
        problems.append(f"llm_config.architectures[0]={arch!r}: the released code accepts only "
                        f"{' / '.join(LLM_ARCHITECTURES)}")  # fmt: skip
    problems += [f"missing top-level field {f!r}" for f in TOP_LEVEL_FIELDS if f not in config]
    vision = config.get("vision_config", {})
    problems += [f"missing vision_config field {f!r}" for f in VISION_FIELDS if f not in vision]
    return problems


def _llm(config: dict[str, Any]) -> dict[str, Any]:
    lm = dict(config["llm_config"])
    lm.setdefault("head_dim", lm["hidden_size"] // lm["num_attention_heads"])
    return lm


def internlm2(config: dict[str, Any]) -> bool:
    return config["llm_config"]["architectures"][0] == "InternLM2VEForCausalLM"


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the released model class for ``config``."""
    v, lm = config["vision_config"], _llm(config)
    w, p, mlp = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    merge = round(1 / config["downsample_ratio"])
    h, ffn, vocab, d = lm["hidden_size"], lm["intermediate_size"], lm["vocab_size"], lm["head_dim"]
    q, kv = lm["num_attention_heads"] * d, lm["num_key_value_heads"] * d
    out: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.patch_embedding.weight": (w, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (w,),
        "mlp1.0.weight": (merge * merge * w,),
        "mlp1.0.bias": (merge * merge * w,),
        "mlp1.1.weight": (h, merge * merge * w),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
        "special_token_embedding.weight": (len(SPECIAL_TOKEN_LIST), h),
    }
    for i in range(v["num_hidden_layers"]):
        b = f"vision_model.encoder.layers.{i}."
        out |= {
            b + "norm1.weight": (w,), b + "norm2.weight": (w,), b + "ls1": (w,), b + "ls2": (w,),
            b + "attn.qkv.weight": (3 * w, w), b + "attn.q_norm.weight": (w,),
            b + "attn.k_norm.weight": (w,), b + "attn.proj.weight": (w, w),
            b + "attn.proj.bias": (w,), b + "mlp.fc1.weight": (mlp, w), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (w, mlp), b + "mlp.fc2.bias": (w,),
        }  # fmt: skip
    if internlm2(config):
        bias = lm.get("bias", True)  # InternLM2Config's default
        out |= {
            "language_model.model.tok_embeddings.weight": (vocab, h),
            "language_model.model.norm.weight": (h,),
            "language_model.output.weight": (vocab, h),
        }
        for i in range(lm["num_hidden_layers"]):
            b = f"language_model.model.layers.{i}."
            for s in ("", "_ve"):
                out[f"{b}attention.wqkv{s}.weight"] = (q + 2 * kv, h)
                out[f"{b}attention.wo{s}.weight"] = (h, q)
                if bias:
                    out[f"{b}attention.wqkv{s}.bias"] = (q + 2 * kv,)
                    out[f"{b}attention.wo{s}.bias"] = (h,)
                out |= {
                    f"{b}feed_forward{s}.w1.weight": (ffn, h),
                    f"{b}feed_forward{s}.w3.weight": (ffn, h),
                    f"{b}feed_forward{s}.w2.weight": (h, ffn),
                }
            out[b + "attention_norm.weight"] = (h,)
            out[b + "ffn_norm.weight"] = (h,)
    else:
        out |= {
            "language_model.model.embed_tokens.weight": (vocab, h),
            "language_model.model.norm.weight": (h,),
            "language_model.lm_head.weight": (vocab, h),
        }
        for i in range(lm["num_hidden_layers"]):
            b = f"language_model.model.layers.{i}."
            for s in ("", "_ve"):
                out |= {
                    f"{b}self_attn.q_proj{s}.weight": (q, h),
                    f"{b}self_attn.k_proj{s}.weight": (kv, h),
                    f"{b}self_attn.v_proj{s}.weight": (kv, h),
                    f"{b}self_attn.o_proj{s}.weight": (h, q),
                    f"{b}self_attn.q_norm{s}.weight": (d,),
                    f"{b}self_attn.k_norm{s}.weight": (d,),
                    f"{b}mlp{'_ve' if s else ''}.gate_proj.weight": (ffn, h),
                    f"{b}mlp{'_ve' if s else ''}.up_proj.weight": (ffn, h),
                    f"{b}mlp{'_ve' if s else ''}.down_proj.weight": (h, ffn),
                }
            out[b + "input_layernorm.weight"] = (h,)
            out[b + "post_attention_layernorm.weight"] = (h,)
    return out


def load(
    directory: str | Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str], list[str]]:
    """``(config, state_dict, missing, unexpected)`` of an HF directory read as the released
    class would read it (missing: expected names absent or of another shape)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state |= load_file(str(f))
    want = expected_tensors(config)
    missing = sorted(n for n, s in want.items() if n not in state or tuple(state[n].shape) != s)
    unexpected = sorted(n for n in state if n not in want)
    return config, state, missing, unexpected


# ------------------------------------------------------------------------------------------
# images and prompts (sections 2-4)


def _qwen_smart_resize(
    height: int, width: int, min_pixels: Any, max_pixels: Any
) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=1, min_pixels=min_pixels, max_pixels=max_pixels)


def _one_scale(image: Any, min_pixels: Any, max_pixels: Any, patch: int, merge: int):
    """``(pixel_values [n, 3, p, p] float64, (1, gh, gw))`` of one scale."""
    from PIL import Image

    h, w = _qwen_smart_resize(image.height, image.width, min_pixels, max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    unit = patch * merge
    gh, gw = -(-h // unit) * merge, -(-w // unit) * merge
    arr = np.zeros((gh * patch, gw * patch, 3), np.float64)
    arr[:h, :w] = np.asarray(image, np.float64)
    arr = (arr / 255.0 - 0.5) / 0.5  # zero padding becomes -1
    x = arr.reshape(gh // merge, merge, patch, gw // merge, merge, patch, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # units raster, patches row-major inside, [C, p, p]
    return torch.from_numpy(x.reshape(gh * gw, 3, patch, patch).copy()), (1, gh, gw)


def preprocess(image: Any, config: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """One image's scales as the released demo packs them (smallest first): ``pixel_values``
    ``[n, 3, p, p]`` float64 and one ``(t, h, w)`` grid per scale."""
    patch = config["vision_config"]["patch_size"]
    merge = round(1 / config["downsample_ratio"])
    min_pixels = config["min_dynamic_patch"] * patch**2
    max_pixels = config["max_dynamic_patch"] * patch**2
    ratio = config["scale_downsample_ratio"]
    image = image.convert("RGB")
    pixels, grid = _one_scale(image, min_pixels, max_pixels, patch, merge)
    scales, grids = [pixels], [grid]
    while True:
        # the demo's arithmetic: an int64 tensor times a Python float is a float32 tensor
        current = torch.tensor(grids[0]).prod() * patch**2
        budget = current * (ratio**2)
        if budget < min_pixels:
            break
        pixels, grid = _one_scale(image, min_pixels, budget, patch, merge)
        if math.prod(grid) >= math.prod(grids[0]):
            break
        scales.insert(0, pixels)
        grids.insert(0, grid)
    return torch.cat(scales), grids


def prompt(question: str, grids: Sequence[Sequence[int]], num_scales: Sequence[int],
           config: dict[str, Any]) -> str:  # fmt: skip
    """The released ``chat``'s query text: ``<image>\\n`` per image when the question has none,
    the template with its system turn (``config["system_message"]`` or the default), each
    ``<image>`` replaced by its block (per scale ``h`` rows of ``w`` ``<IMG_CONTEXT>`` +
    ``<IMG_LINE_BREAK>``, then ``<IMG_FRAME_BREAK>``)."""
    if num_scales and "<image>" not in question:
        question = "<image>\n" * len(num_scales) + question
    system = config.get("system_message", DEFAULT_SYSTEM_MESSAGE)
    text = f"<|im_start|>system\n{system}<|im_end|>" if system else ""
    text += f"<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n"
    if config["template"] != "internlm2-chat":
        text += "<think>\n\n</think>\n\n"
    merge = round(1 / config["downsample_ratio"])
    start = 0
    for n in num_scales:
        block = "<img>"
        for t, h, w in grids[start : start + n]:
            block += (("<IMG_CONTEXT>" * (w // merge) + "<IMG_LINE_BREAK>") * (h // merge)
                      + "<IMG_FRAME_BREAK>") * t  # fmt: skip
        text = text.replace("<image>", block + "</img>", 1)
        start += n
    return text


# ------------------------------------------------------------------------------------------
# the model


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """``q [n, H, d]``, ``k/v [n, H, d]`` (heads already repeated), ``allowed [n, n]``."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def window_index(grids: Sequence[Sequence[int]], merge: int, window_size: int):
    """``(index over merge units, window bounds in patches)``: each merged grid padded by
    ``ws - h % ws`` (a whole extra window when it divides, as the released code does) with
    -100, windows raster, units raster inside, padding dropped, empty windows collapsed."""
    ws = window_size // merge
    index, bounds, base = [], [0], 0
    for t, gh, gw in grids:
        lh, lw = gh // merge, gw // merge
        ids = torch.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = ws - lh % ws, ws - lw % ws
        padded = F.pad(ids, (0, pw, 0, ph), value=-100)
        nh, nw = (lh + ph) // ws, (lw + pw) // ws
        padded = (
            padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
        )
        sizes = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        for s in sizes.tolist():
            if s:
                bounds.append(bounds[-1] + s * merge * merge)
        base += t * lh * lw
    return torch.cat(index), bounds


class Reference:
    """The released model's forward for one sequence, float64 (module doc)."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.config, self.v, self.lm = config, config["vision_config"], _llm(config)
        self.sd = {k: t.double() for k, t in state.items()}
        self.merge = round(1 / config["downsample_ratio"])
        self.internlm2 = internlm2(config)
        self.special_ids: list[int] | None = None

    def init_special_token_ids(self, tokenizer: Any) -> None:
        """Section 5: the 12 ids from the tokenizer."""
        self.special_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKEN_LIST]

    # vision ----------------------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[n, W]`` features in the released (window) order."""
        v, sd, merge = self.v, self.sd, self.merge
        w, heads = v["hidden_size"], v["num_attention_heads"]
        hd, eps = w // heads, v["layer_norm_eps"]
        p = v["patch_size"]
        emb = "vision_model.embeddings.patch_embedding."
        x = F.conv2d(pixel_values.double().view(-1, 3, p, p), sd[emb + "weight"], sd[emb + "bias"])
        x = x.flatten(1)
        # Qwen2-VL rot_pos_emb: (row, col) per patch in merge-unit order, half the
        # frequencies each
        rows, cols = [], []
        for t, gh, gw in grids:
            r = torch.arange(gh)[:, None].expand(gh, gw)
            c = torch.arange(gw)[None, :].expand(gh, gw)
            for a, out in ((r, rows), (c, cols)):
                out.append(a.reshape(gh // merge, merge, gw // merge, merge).permute(0, 2, 1, 3)
                           .flatten().repeat(t))  # fmt: skip
        rows_t, cols_t = torch.cat(rows), torch.cat(cols)
        dim = hd // 2
        theta = v.get("rope_theta", 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = torch.cat([rows_t[:, None] * inv, cols_t[:, None] * inv], dim=-1)
        ang = torch.cat([freqs, freqs], dim=-1)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        n = x.shape[0]
        full_bounds = [0]
        for t, gh, gw in grids:
            for _ in range(t):
                full_bounds.append(full_bounds[-1] + gh * gw)
        window = v.get("window_size")
        win_bounds = full_bounds
        if window is not None:
            units, win_bounds = window_index(grids, merge, window)
            unit = merge * merge
            order = (units[:, None] * unit + torch.arange(unit)).flatten()
            x, cos, sin = x[order], cos[order], sin[order]

        def allowed(bounds: list[int]) -> torch.Tensor:
            seg = torch.zeros(n, dtype=torch.long)
            for k in range(len(bounds) - 1):
                seg[bounds[k] : bounds[k + 1]] = k
            return seg[:, None] == seg[None, :]

        full_mask, win_mask = allowed(full_bounds), allowed(win_bounds)
        fullatt = v.get("fullatt_block_indexes")
        for i in range(v["num_hidden_layers"]):
            b = f"vision_model.encoder.layers.{i}."
            mask = full_mask if fullatt is None or i in fullatt else win_mask
            hdn = _rms(x, sd[b + "norm1.weight"], eps)
            q, k, val = (hdn @ sd[b + "attn.qkv.weight"].T).split(w, dim=-1)
            q = _rms(q, sd[b + "attn.q_norm.weight"], eps).view(n, heads, hd)
            k = _rms(k, sd[b + "attn.k_norm.weight"], eps).view(n, heads, hd)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            o = _attend(q, k, val.view(n, heads, hd), mask).reshape(n, w)
            x = x + sd[b + "ls1"] * (o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"])
            hdn = _rms(x, sd[b + "norm2.weight"], eps)
            hdn = F.gelu(hdn @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
            x = x + sd[b + "ls2"] * (hdn @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])
        return x

    def connector(self, feats: torch.Tensor) -> torch.Tensor:
        """pixel shuffle (each merge unit's patches ``[p00, p01, p10, p11]``) + ``mlp1``."""
        m, sd = self.merge, self.sd
        x = feats.reshape(-1, m, m, feats.shape[-1]).reshape(feats.shape[0] // (m * m), -1)
        x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], eps=1e-5)
        x = F.gelu(x @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"])
        return x @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]

    # language model ----------------------------------------------------------------------
    def _attention(self, b: str, h: torch.Tensor, visual: torch.Tensor, cos, sin) -> torch.Tensor:
        lm, sd = self.lm, self.sd
        n, d = h.shape[0], lm["head_dim"]
        heads, kvh = lm["num_attention_heads"], lm["num_key_value_heads"]
        pick = visual[:, None, None]
        if self.internlm2:
            per = heads // kvh

            def qkv(suffix: str):
                y = h @ sd[f"{b}attention.wqkv{suffix}.weight"].T
                if f"{b}attention.wqkv{suffix}.bias" in sd:
                    y = y + sd[f"{b}attention.wqkv{suffix}.bias"]
                y = y.view(n, kvh, per + 2, d)
                return y[:, :, :per].reshape(n, heads, d), y[:, :, per], y[:, :, per + 1]

            (qt, kt, vt), (qv, kv_, vv) = qkv(""), qkv("_ve")
        else:

            def qkv(suffix: str):
                q = (h @ sd[f"{b}self_attn.q_proj{suffix}.weight"].T).view(n, heads, d)
                k = (h @ sd[f"{b}self_attn.k_proj{suffix}.weight"].T).view(n, kvh, d)
                v = (h @ sd[f"{b}self_attn.v_proj{suffix}.weight"].T).view(n, kvh, d)
                eps = lm["rms_norm_eps"]
                q = _rms(q, sd[f"{b}self_attn.q_norm{suffix}.weight"], eps)
                k = _rms(k, sd[f"{b}self_attn.k_norm{suffix}.weight"], eps)
                return q, k, v

            (qt, kt, vt), (qv, kv_, vv) = qkv(""), qkv("_ve")
        q, k, v = torch.where(pick, qv, qt), torch.where(pick, kv_, kt), torch.where(pick, vv, vt)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = heads // kvh
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        ctx = _attend(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal)
        ctx = ctx.reshape(n, heads * d)
        if self.internlm2:

            def wo(x: torch.Tensor, suffix: str) -> torch.Tensor:
                y = x @ sd[f"{b}attention.wo{suffix}.weight"].T
                bias = sd.get(f"{b}attention.wo{suffix}.bias")
                return y if bias is None else y + bias

            text = wo(ctx, "")
            return torch.where(visual[:, None], wo(text, "_ve"), text)  # wo, then wo_ve
        text = ctx @ sd[f"{b}self_attn.o_proj.weight"].T
        vis = ctx @ sd[f"{b}self_attn.o_proj_ve.weight"].T
        return torch.where(visual[:, None], vis, text)

    def _ffn(self, b: str, h: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        sd = self.sd
        if self.internlm2:
            names = [(f"{b}feed_forward{s}.w1", f"{b}feed_forward{s}.w3", f"{b}feed_forward{s}.w2")
                     for s in ("", "_ve")]  # fmt: skip
        else:
            names = [(f"{b}{m}.gate_proj", f"{b}{m}.up_proj", f"{b}{m}.down_proj")
                     for m in ("mlp", "mlp_ve")]  # fmt: skip
        out = []
        for gate, up, down in names:
            g = F.silu(h @ sd[gate + ".weight"].T) * (h @ sd[up + ".weight"].T)
            out.append(g @ sd[down + ".weight"].T)
        return torch.where(visual[:, None], out[1], out[0])

    def logits(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grids: Sequence[Sequence[int]] = (),
    ) -> torch.Tensor:
        """``[T, V]`` float64 logits of one sequence ``input_ids [T]`` (positions 0..T-1)."""
        if self.special_ids is None:
            raise ValueError("call init_special_token_ids(tokenizer) first")
        lm, sd = self.lm, self.sd
        pre = "language_model.model."
        embed = sd[pre + ("tok_embeddings" if self.internlm2 else "embed_tokens") + ".weight"]
        x = embed[input_ids].clone()  # every id must be inside the LLM vocabulary
        for row, tid in enumerate(self.special_ids):
            x[input_ids == tid] = sd["special_token_embedding.weight"][row]
        context = input_ids == self.special_ids[SPECIAL_TOKEN_LIST.index("<IMG_CONTEXT>")]
        if pixel_values is not None and len(grids):
            feats = self.connector(self.vision(pixel_values, grids))
            if feats.shape[0] != int(context.sum()):
                raise ValueError(f"{feats.shape[0]} image features, {int(context.sum())} slots")
            x[context] = feats
        visual = context | (input_ids == self.special_ids[SPECIAL_TOKEN_LIST.index("<img>")])
        n, d = x.shape[0], lm["head_dim"]
        inv = 1.0 / lm["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        eps = lm["rms_norm_eps"]
        for i in range(lm["num_hidden_layers"]):
            b = f"{pre}layers.{i}."
            n1, n2 = (("attention_norm", "ffn_norm") if self.internlm2
                      else ("input_layernorm", "post_attention_layernorm"))  # fmt: skip
            x = x + self._attention(b, _rms(x, sd[f"{b}{n1}.weight"], eps), visual, cos, sin)
            x = x + self._ffn(b, _rms(x, sd[f"{b}{n2}.weight"], eps), visual)
        x = _rms(x, sd[pre + "norm.weight"], eps)
        head = "language_model.output.weight" if self.internlm2 else "language_model.lm_head.weight"
        return x @ sd[head].T


# ------------------------------------------------------------------------------------------
# this project's side of a comparison (not part of the reference)


def pipeline_logits_rank(
    checkpoint: str, tokenizer: str, images: list[str], question: str
) -> bytes:
    """In one spawned rank: for each image, the prompt this project builds for it and
    ``question`` (the indexer's rendering and image rules, the loader's pixels, the model's
    token order), and a megatron checkpoint's float64 logits on it; pickled list of dicts
    ``{"ids", "patches", "grids", "logits"}``."""
    import pickle
    import warnings

    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.checkpoint.model import load_model
    from megatron_navil.data.tokenizer import TextTokenizer
    from megatron_navil.inference.inputs import image_inputs, indexer_settings, pack_inputs
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize()
    cfg = resolve_config(checkpoint)
    tok = TextTokenizer(tokenizer)
    model = load_model(cfg, checkpoint, tok.special_ids, groups)
    window = cfg.vision.window_units(cfg.connector.merge)
    out = []
    for inp in image_inputs(images, tok, indexer_settings(cfg), question):
        with torch.no_grad():
            logits = model(**pack_inputs([inp], [inp.input_ids], window))[:, 0].double()
        out.append({"ids": inp.input_ids.tolist(), "patches": inp.patches,
                    "grids": [list(g) for g in inp.grids], "logits": logits})  # fmt: skip
    return pickle.dumps(out)
