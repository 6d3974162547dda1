"""HF -> megatron dist checkpoint at a chosen TP/PP/EP layout.

Two sources, one writer:

* :class:`NaViLSource`: an HF NaViL directory (ours or the official format); every megatron
  tensor comes from its HF tensor(s) through ``mapping.rules`` (exact inverses of the export).
* :class:`LLMSource`: an HF causal LM (Llama/Mistral, Qwen3, InternLM2 families: no biases,
  SwiGLU, RMSNorm, plain RoPE): the LLM's tensors become the *text* experts and, copied, the
  *visual* experts (NaViL's recipe, ../shared/NAVIL.md "Expert initialisation"); the vision
  encoder, connector and special-token table keep the model's fresh initialisation.

The writer (:func:`write_rank`) runs on every rank of the layout (spawned gloo processes, or
torchrun): it builds the real model for the layout, fills each parameter shard from the
source's global tensor and saves through ``checkpoint.store.save`` (iteration 0, no
optimizer), so the result is exactly what training writes and loads at any layout
(``--load``-style loading of weights; an optimizer starts fresh). Every source tensor is
accounted for before any rank starts (``check_names``): a missing or unknown one fails with
its name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_navil.config.io import config_from_dict
from megatron_navil.config.model import ExpertsConfig, LanguageConfig, NaViLConfig
from megatron_navil.conversion.hf_io import SafetensorsDir
from megatron_navil.conversion.mapping import ConversionError, Rule, check_names, rules

# ------------------------------------------------------------------------------------------
# sources


class NaViLSource:
    """Megatron tensors of an HF NaViL directory."""

    def __init__(self, directory: str | Path, cfg: NaViLConfig) -> None:
        self.files = SafetensorsDir(directory)
        self.by_key: dict[str, Rule] = {r.megatron: r for r in rules(cfg)}
        expected = {
            n: s for r in self.by_key.values() for n, s in zip(r.hf, r.hf_shapes, strict=True)
        }
        check_names(self.files.shapes, expected, str(directory))

    def fresh(self) -> set[str]:
        return set()

    def tensor(self, key: str) -> torch.Tensor:
        rule = self.by_key[key]
        return rule.from_hf([self.files.read(n) for n in rule.hf])


LLM_FAMILIES = {"llama": "qwen3", "mistral": "qwen3", "qwen2": "qwen3", "qwen3": "qwen3"}
LLM_FAMILIES["internlm2"] = "internlm2"
_IGNORED_LLM = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


def llm_language_config(config: dict[str, Any], qk_norm: bool) -> LanguageConfig:
    """NaViL's ``LanguageConfig`` of an HF LLM ``config.json`` (ConversionError naming what
    NaViL's LLM cannot express: biases, scaled RoPE, a non-SiLU activation)."""
    model_type = config.get("model_type")
    if model_type not in LLM_FAMILIES:
        raise ConversionError(
            f"LLM model_type={model_type!r}: supported {', '.join(sorted(LLM_FAMILIES))}"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"LLM hidden_act={act!r}: NaViL's experts are SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias", "bias"):
        if config.get(flag):
            raise ConversionError(f"LLM {flag}=True: NaViL's LLM has no biases")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConversionError(f"LLM rope_scaling={scaling}: NaViL uses plain RoPE")
    params = config.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ConversionError(f"LLM rope_parameters={params}: NaViL uses plain RoPE")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    return LanguageConfig(
        variant=LLM_FAMILIES[model_type],  # type: ignore[arg-type]
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn=config["intermediate_size"],
        vocab=config["vocab_size"],
        rope_theta=float(theta),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        qk_norm=qk_norm,
    )


def _llm_name(hf_name: str, internlm2: bool) -> str:
    """The HF LLM tensor a NaViL ``language_model.*`` tensor is initialised from (the visual
    expert's ``*_ve`` from the text expert's)."""
    name = hf_name.removeprefix("language_model.")
    for ve in ("_proj_ve.", "_norm_ve.", "mlp_ve.", "feed_forward_ve.", "wqkv_ve.", "wo_ve."):
        name = name.replace(ve, ve.replace("_ve", ""))
    return name


VOCAB_KEYS = ("embedding.weight", "output_layer.weight")  # megatron tensors with a row per id


def pad_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` ``[v, h]`` with rows ``v .. rows - 1`` added, each the mean of the existing
    rows (computed in fp32). The rule of HF's ``resize_token_embeddings`` by default (its
    ``mean_resizing``, up to the small noise it adds): a new token's embedding is an
    average token, and a new LM-head row gives every position the average of the existing
    logits, so the next-token distribution over the LLM's own vocabulary barely moves
    (N(0, init_std) rows could give new ids logits far from the trained ones)."""
    v = weight.shape[0]
    if rows < v:
        raise ValueError(f"cannot pad {v} vocabulary rows down to {rows}")
    if rows == v:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - v, -1)], 0)


class LLMSource:
    """Megatron tensors of an HF LLM: text and visual experts from its layers (see module).
    The embedding and LM head may have fewer rows than ``cfg.language.vocab`` (the vocabulary
    padded to hold the tokenizer, ``llm_vocab_plan``): the rows beyond the LLM's are
    :func:`pad_vocab_rows` (the mean of its rows)."""

    def __init__(self, directory: str | Path, cfg: NaViLConfig, tied: bool) -> None:
        self.files = SafetensorsDir(directory)
        internlm2 = cfg.language.variant == "internlm2"
        self.by_key: dict[str, tuple[Rule, list[str]]] = {}
        needed: dict[str, tuple[int, ...]] = {}
        self._fresh: set[str] = set()
        self.vocab = cfg.language.vocab
        head = "output.weight" if internlm2 else "lm_head.weight"
        embed = "model.tok_embeddings.weight" if internlm2 else "model.embed_tokens.weight"
        self.aliases = {head: embed} if tied else {}
        # the LLM's own vocabulary: its embedding's rows (at most the model's, checked below)
        llm_rows = self.files.shapes.get(embed, (self.vocab,))[0]
        for rule in rules(cfg):
            if not rule.hf[0].startswith("language_model."):
                self._fresh.add(rule.megatron)
                continue
            names = [_llm_name(n, internlm2) for n in rule.hf]
            self.by_key[rule.megatron] = (rule, names)
            for name, shape in zip(names, rule.hf_shapes, strict=True):
                if rule.megatron in VOCAB_KEYS and llm_rows <= shape[0]:
                    shape = (llm_rows, *shape[1:])
                needed[self.aliases.get(name, name)] = shape
        found = {k: v for k, v in self.files.shapes.items() if not k.endswith(_IGNORED_LLM)}
        if tied and head in found:
            raise ConversionError(f"{directory}: tie_word_embeddings=True but {head!r} is stored")
        check_names(found, needed, str(directory))

    def fresh(self) -> set[str]:
        return set(self._fresh)

    def tensor(self, key: str) -> torch.Tensor:
        rule, names = self.by_key[key]
        out = rule.from_hf([self.files.read(self.aliases.get(n, n)) for n in names])
        return pad_vocab_rows(out, self.vocab) if key in VOCAB_KEYS else out


def llm_navil_config(base: NaViLConfig, llm_dir: str | Path) -> tuple[NaViLConfig, bool]:
    """``base`` with its language part taken from the HF LLM in ``llm_dir``; and whether the
    LLM ties its embeddings (its LM head is then the embedding, copied)."""
    config = json.loads((Path(llm_dir) / "config.json").read_text())
    files = SafetensorsDir(llm_dir)
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in files.shapes)
    language = llm_language_config(config, qk_norm)
    cfg = base.replace(language=language, experts=ExpertsConfig())
    return cfg.validate(), bool(config.get("tie_word_embeddings", False))


@dataclass(frozen=True)
class VocabPlan:
    """How an LLM import sizes NaViL's vocabulary (``llm_vocab_plan``)."""

    llm: int  # the LLM's vocab_size (its embedding rows)
    tokenizer: int  # the tokenizer's ids (with the NaViL tokens it adds)
    special_ids: tuple[int, ...]  # the 12 NaViL ids
    vocab: int  # the model's: max(llm, tokenizer, max special + 1), padded

    @property
    def new_rows(self) -> int:
        return self.vocab - self.llm

    def describe(self) -> str:
        """One log line: the sizes, the NaViL ids outside the LLM's vocabulary, the init."""
        if self.new_rows == 0:
            return f"vocab {self.llm} (the tokenizer's {self.tokenizer} ids fit; no new rows)"
        outside = [i for i in self.special_ids if i >= self.llm]
        why = []
        if outside:
            why.append(
                f"{len(outside)} NaViL tokens at {min(outside)}..{max(outside)} were outside "
                "the LLM's vocabulary"
            )
        if self.tokenizer > max(self.llm, max(self.special_ids, default=-1) + 1):
            why.append(f"the tokenizer has {self.tokenizer} ids")
        why.append(f"{self.new_rows} new rows initialised to the mean embedding")
        return f"vocab {self.llm} -> {self.vocab} ({'; '.join(why)})"


def llm_vocab_plan(llm_vocab: int, tokenizer_size: int, special_ids: list[int],
                   divisible_by: int, tp: int) -> VocabPlan:  # fmt: skip
    """The NaViL vocabulary of an LLM import: every LLM row, every tokenizer id and every
    special id is a row, padded to a multiple of ``divisible_by * tp``. An LLM whose
    vocabulary already holds them all and splits evenly over ``tp`` (all the vocab-parallel
    layers need) keeps its size: no rows to invent, and an import of Qwen3-8B stays at the
    released NaViL-9B's 151,936 at TP=8 (a multiple of 128 x 8 would be 152,576)."""
    from megatron_navil.config.vocab import needed_vocab, padded_vocab_size

    need = needed_vocab(max(llm_vocab, tokenizer_size), special_ids)
    if need == llm_vocab and llm_vocab % tp == 0:
        return VocabPlan(llm_vocab, tokenizer_size, tuple(special_ids), llm_vocab)
    vocab = padded_vocab_size(need, divisible_by, tp)
    return VocabPlan(llm_vocab, tokenizer_size, tuple(special_ids), vocab)


def tokenizer_special_ids(path: str | Path) -> list[int]:
    """The 12 special-token ids (``SPECIAL_TOKENS`` order) of a tokenizer: a
    ``tokenizer.json`` / ``tokenizer.model`` file, or an HF directory holding one (its
    ``tokenizer.json`` first). For a sentencepiece model the tokens the file lacks are the
    tokens the directory's ``tokenizer_config.json`` (``added_tokens_decoder``) or
    ``added_tokens.json`` adds, as the released code's ``convert_tokens_to_ids`` finds them;
    without either, ``TextTokenizer``'s rule (``vocab_size + k`` in that order, NaViL-2B's
    92544..92555). ConversionError when there is no tokenizer or a token has no id."""
    from megatron_navil.config.tokens import SPECIAL_TOKENS
    from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError, is_json, tokenizer_file

    try:
        p = tokenizer_file(path)
    except TokenizerError:
        raise ConversionError(
            f"{path}: no tokenizer.json or tokenizer.model to take ids from"
        ) from None
    if not p.is_file():
        raise ConversionError(f"{p}: no such tokenizer file")
    added: dict[str, int] = {}
    config = p.parent / "tokenizer_config.json"
    sentencepiece = not is_json(p.read_bytes())
    if sentencepiece and config.is_file():
        decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
        added = {entry["content"]: int(i) for i, entry in decoder.items()}
    if sentencepiece and (p.parent / "added_tokens.json").is_file():
        added |= {
            k: int(v) for k, v in json.loads((p.parent / "added_tokens.json").read_text()).items()
        }
    tok = TextTokenizer(p)
    return [added.get(t, tok.special_ids[t]) for t in SPECIAL_TOKENS]


# ------------------------------------------------------------------------------------------
# the writer


@dataclass(frozen=True)
class ImportSpec:
    """Everything a rank needs (picklable)."""

    kind: str  # "navil" or "llm"
    source: str
    out: str
    cfg: dict[str, Any]
    special_token_ids: tuple[int, ...]
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    seed: int = 1234
    tied: bool = False
    first_stage_layers: int | None = None


def world_size(tp: int, pp: int, ep: int, etp: int | None) -> int:
    """Ranks of the smallest layout with these sizes: TP x PP x DP where DP is the least that
    lets ``ep * etp`` divide ``TP * DP`` (megatron-core's expert layout)."""
    ep_group = ep * (etp or tp)
    dp = ep_group // math.gcd(tp, ep_group)
    return tp * pp * dp


def write_rank(spec: ImportSpec) -> int:
    """One rank of the import: build, fill, save. Returns the number of shards it filled."""
    import warnings

    from megatron_navil.checkpoint.store import save
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.models.init import sharded_parameters
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    cfg = config_from_dict(spec.cfg)
    groups = initialize(tp=spec.tp, pp=spec.pp, ep=spec.ep, etp=spec.etp, seed=spec.seed)
    mcore_config = transformer_config(cfg, tp=spec.tp, pp=spec.pp, ep=spec.ep, etp=spec.etp)
    # an LLM import keeps the fresh vision tower and connector of the build: drawn by name, so
    # they are the same at every import layout (models/init.py)
    chunks = build_model(
        cfg, mcore_config, groups, special_ids=spec.special_token_ids,
        first_stage_layers=spec.first_stage_layers,
        init_seed=spec.seed if spec.kind == "llm" else None,
    )  # fmt: skip
    if spec.kind == "navil":
        source: NaViLSource | LLMSource = NaViLSource(spec.source, cfg)
    else:
        source = LLMSource(spec.source, cfg, spec.tied)
    known = {r.megatron for r in rules(cfg)}
    fresh = source.fresh()
    filled = 0
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for sh in sharded_parameters(chunks):
            if sh.key not in known:
                raise ConversionError(f"model parameter {sh.key!r} has no conversion rule")
            if sh.key in fresh:
                continue
            if sh.key not in cache:
                cache.clear()  # one global tensor at a time (factories repeat a key)
                cache[sh.key] = source.tensor(sh.key)
            full = cache[sh.key]
            if tuple(full.shape) != tuple(sh.global_shape):
                raise ConversionError(
                    f"{sh.key}: source gives {tuple(full.shape)}, model has {sh.global_shape}"
                )
            sh.data.copy_(full[sh.global_slice()].reshape(sh.data.shape))
            filled += 1
    state = {"converted_from": {"kind": spec.kind, "path": spec.source}}
    save(spec.out, 0, chunks, None, state, model_config=spec.cfg)
    return filled


def run_import(spec: ImportSpec, timeout: float = 24 * 3600) -> Path:
    """Spawn the layout's ranks (gloo) and write ``<out>/iter_0000000``; returns it."""
    from megatron_navil.parallel.spawn import run_distributed

    out = Path(spec.out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: output directory exists and is not empty")
    run_distributed(
        write_rank, world_size(spec.tp, spec.pp, spec.ep, spec.etp), spec, timeout=timeout
    )
    return out / "iter_0000000"
