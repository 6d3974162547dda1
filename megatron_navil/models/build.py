"""From a :class:`NaViLConfig` and a parallel layout to megatron-core's TransformerConfig and
this rank's model chunks (one per virtual pipeline stage), in the process groups
``megatron_navil.parallel.initialize()`` returned.

Pipeline layout: virtual stage ``v = chunk * pp + pp_rank`` (megatron-core's interleaved
order); stage 0 holds the vision encoder, connector and embeddings, and may be given fewer LLM
layers (``first_stage_layers``) because the encoder's cost counts against it; the last stage
holds the final norm and LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from megatron_navil.config.model import NaViLConfig, Recompute
from megatron_navil.parallel.groups import ParallelGroups, vision_groups


def stage_layer_ranges(
    num_layers: int, stages: int, first_stage_layers: int | None = None
) -> list[range]:
    """Global LLM layer indices of each (virtual) pipeline stage, in stage order.

    Without ``first_stage_layers`` the layers split evenly (``num_layers`` must divide). With
    it, stage 0 gets that many (0 allowed: only the vision tower and embeddings) and the rest
    split over the other stages, the earlier ones taking one more when it does not divide.
    """
    if stages < 1:
        raise ValueError(f"pipeline stages must be >= 1, got {stages}")
    if first_stage_layers is None:
        if num_layers % stages:
            raise ValueError(
                f"LanguageConfig.layers={num_layers} does not split evenly over {stages} "
                "pipeline stages; pass first_stage_layers to give stage 0 fewer"
            )
        sizes = [num_layers // stages] * stages
    else:
        if stages == 1 and first_stage_layers != num_layers:
            raise ValueError(
                f"first_stage_layers={first_stage_layers} with one pipeline stage must equal "
                f"the {num_layers} layers"
            )
        if not 0 <= first_stage_layers <= num_layers:
            raise ValueError(f"first_stage_layers={first_stage_layers} outside [0, {num_layers}]")
        rest = num_layers - first_stage_layers
        base, extra = divmod(rest, max(stages - 1, 1))
        sizes = [first_stage_layers] + [base + (i < extra) for i in range(stages - 1)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def layout_problem(
    cfg: NaViLConfig,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    first_stage_layers: int | None = None,
) -> str | None:
    """Why ``cfg`` cannot be built in this layout (one line), or None: checked before any
    rank starts, so a converter or launcher fails with this instead of a multi-rank
    traceback. The vision tower never blocks a layout (it is replicated when its heads do
    not split)."""
    lm, etp = cfg.language, etp or tp
    for name, value, by, what in (
        ("heads", lm.heads, tp, "TP"),
        ("kv_heads", lm.kv_heads, tp, "TP"),
        ("vocab", lm.vocab, tp, "TP"),
        ("ffn", lm.ffn, etp, "expert-TP"),
        ("experts", 2 * cfg.experts.per_modality, ep, "EP"),
    ):
        if value % by:
            hint = " (pad it: --make-vocab-size-divisible-by)" if name == "vocab" else ""
            return f"{name}={value} does not split over {what}={by}{hint}"
    try:
        stage_layer_ranges(lm.layers, pp, first_stage_layers)
    except ValueError as exc:
        return f"{exc} (--first-stage-layers)" if first_stage_layers is None else str(exc)
    return None


def transformer_config(
    cfg: NaViLConfig,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    etp: int | None = None,
    dtype: torch.dtype = torch.float32,
    cp: int = 1,
    **overrides: Any,
) -> Any:
    """megatron-core TransformerConfig of the LLM (the vision tower derives its own from it).

    Sequence parallelism is on whenever TP > 1 (megatron-core's MoE requires it). Fusions that
    need TransformerEngine/apex are off unless overridden; CPU-safe initialisation.
    ``cp``: ``context_parallel_size`` (megatron-core's MoE router normalises its auxiliary
    losses over TP x CP with it; its own CP attention, TransformerEngine's, is never built:
    the attention is ``models.cp_attention``)."""
    from megatron.core.transformer import TransformerConfig

    lm, ex = cfg.language, cfg.experts
    kwargs: dict[str, Any] = dict(
        num_layers=lm.layers,
        hidden_size=lm.hidden,
        num_attention_heads=lm.heads,
        num_query_groups=lm.kv_heads,
        kv_channels=lm.head_dim,
        ffn_hidden_size=lm.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        qk_layernorm=lm.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        num_moe_experts=2 * ex.per_modality,
        moe_ffn_hidden_size=lm.ffn,
        moe_router_topk=ex.topk,
        moe_router_pre_softmax=ex.topk == 1,  # top-1 needs it (megatron-core checks)
        moe_aux_loss_coeff=ex.aux_loss_coeff,
        moe_router_load_balancing_type="none",  # ModalityRouter balances per modality itself
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp or tp,
        context_parallel_size=cp,
        sequence_parallel=tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def special_token_ids(cfg: NaViLConfig, ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The 12 special tokens' ids in ``SPECIAL_TOKENS`` order: ``ids`` when given (from the
    tokenizer), else ``special_token_first_id + row``."""
    from megatron_navil.config.tokens import SPECIAL_TOKENS

    if ids is None:
        first = cfg.special_token_first_id
        if first is None:
            raise ValueError(
                f"{cfg.name}: special_token_first_id is None; pass the 12 special token ids "
                "from the tokenizer"
            )
        ids = range(first, first + len(SPECIAL_TOKENS))
    ids = tuple(int(i) for i in ids)
    if len(ids) != len(SPECIAL_TOKENS) or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(
            f"special token ids must be {len(SPECIAL_TOKENS)} distinct ids >= 0: {ids}"
        )
    return ids


VISION_PARALLEL = ("tp", "dp")


def resolve_vision_parallel(requested: str, cfg: NaViLConfig, tp: int) -> str:
    """``--vision-parallel``: ``auto`` is ``dp`` where the vision heads (or MLP) do not divide
    ``tp`` (the tower would otherwise run whole on every TP rank), else ``tp``."""
    from megatron_navil.models.vision import tp_size_for

    if requested not in ("auto", *VISION_PARALLEL):
        raise ValueError(f"vision_parallel must be auto, tp or dp, got {requested!r}")
    if requested != "auto":
        return requested
    return "dp" if tp > 1 and tp_size_for(cfg.vision, tp) != tp else "tp"


def build_model(
    cfg: NaViLConfig,
    mcore_config: Any,
    groups: ParallelGroups,
    *,
    special_ids: Sequence[int] | None = None,
    first_stage_layers: int | None = None,
    recompute: Recompute | None = None,
    init_seed: int | None = None,
    transformer_impl: str = "auto",
    attention_backend: str = "auto",
    moe_path: str = "auto",
    vision_parallel: str = "tp",
) -> list[Any]:
    """This rank's NaViLModel chunks, one per virtual pipeline stage (a list of one without
    interleaving), for the layout of ``groups`` (``megatron_navil.parallel.initialize()``).
    ``recompute``: activation recompute of the LLM layers / vision blocks (None: none).
    ``init_seed``: every matrix's initial value a function of (seed, its name) only, the same
    in every layout (``models.init.init_by_name``); None keeps megatron-core's draw, which
    depends on the layout (for models whose weights are loaded right after).
    ``transformer_impl``: ``local`` (megatron-core's torch modules), ``te``
    (TransformerEngine: its norms, grouped-GEMM experts and the vision tower's linears) or
    ``auto`` (``te`` where it imports on a GPU); ``attention_backend``: ``sdpa``, ``flash``,
    ``torch`` or ``auto`` (the first that runs on this device in ``mcore_config``'s dtype).
    Both are resolved by ``models.impl`` (``BackendUnavailable``, one line, when one asked
    for cannot run) and reach every layer from here.
    ``moe_path``: how the LLM's FFN reaches its experts, ``auto`` (the attention experts'
    gather/scatter at EP=1 with one expert per modality, else megatron-core's token
    dispatcher), ``dispatcher`` or ``split`` (``modality.ModalityMoELayer``); the parameters
    are the same either way.
    ``vision_parallel``: ``tp`` (the tower's heads split over TP where they divide it, else
    the whole tower on every TP rank) or ``dp`` (the whole tower on every TP rank, each
    encoding a cost-balanced share of the images: ``models.vision_dp``); the parameters are
    the same global tensors either way, so checkpoints load across the two."""
    from megatron_navil.models.impl import resolve_attention_backend, resolve_transformer_impl
    from megatron_navil.models.modality import MOE_PATHS
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.models.vision import tp_size_for

    if moe_path not in MOE_PATHS:
        raise ValueError(f"moe_path must be one of {MOE_PATHS}, got {moe_path!r}")
    cuda = torch.cuda.is_available()
    transformer_impl = resolve_transformer_impl(transformer_impl, cuda)
    attention_backend = resolve_attention_backend(
        attention_backend, cuda, mcore_config.params_dtype
    )
    pp, pp_rank, vpp = groups.pp_size, groups.pp_rank, groups.vpp_size
    ranges = stage_layer_ranges(cfg.language.layers, pp * vpp, first_stage_layers)
    ids = special_token_ids(cfg, special_ids)
    if vision_parallel not in VISION_PARALLEL:
        raise ValueError(f"vision_parallel must be one of {VISION_PARALLEL}, got {vision_parallel}")
    tp = groups.tp.size()
    vision_dp = vision_parallel == "dp" and tp > 1
    splits = tp_size_for(cfg.vision, tp) == tp and not vision_dp
    vision_group, vision_replicas = vision_groups(groups, splits)
    chunks = []
    for chunk in range(vpp):
        stage = chunk * pp + pp_rank
        chunks.append(
            NaViLModel(
                cfg,
                mcore_config,
                ranges[stage],
                pre_process=stage == 0,
                post_process=stage == pp * vpp - 1,
                special_token_ids=ids,
                tp_group=groups.tp,
                vision_tp_group=vision_group,
                vision_replica_group=vision_replicas,
                transformer_impl=transformer_impl,
                recompute=recompute,
                attention_backend=attention_backend,
                moe_path=moe_path,
                vision_dp_group=groups.tp if vision_dp else None,
                cp_group=groups.cp,
            )
        )
    if init_seed is not None:
        from megatron_navil.models.init import init_by_name

        init_by_name(chunks, cfg, mcore_config, init_seed)
    return chunks


def moe_path_of(chunks: Sequence[Any]) -> str:
    """The FFN experts' path the chunks' decoder layers took (``modality.ModalityMoELayer``):
    ``split``, ``dispatcher``, or ``none`` for a stage without LLM layers (for the run's
    start line)."""
    paths = {
        layer.mlp.moe_path
        for chunk in chunks
        for layer in getattr(chunk, "module", chunk).layers.children()
    }
    return "/".join(sorted(paths)) or "none"


def meta_parameter_counts(cfg: NaViLConfig, groups: ParallelGroups) -> dict[str, int]:
    """Parameters of the whole model (one stage, TP=EP=1) built on the meta device, so no
    memory is allocated: ``total``, ``activated`` (what one token's forward uses: its
    modality's attention projections and ``topk`` of its group's FFN experts, plus everything
    shared, the vision tower and connector included) and per part. ``groups``: those of a
    1-rank parallel state (``megatron_navil.parallel.initialize()`` in one process)."""
    from megatron_navil.models.navil import NaViLModel

    mcore_config = transformer_config(cfg, perform_initialization=False)
    top = cfg.language.vocab
    ids = special_token_ids(
        cfg, range(top, top + 12) if cfg.special_token_first_id is None else None
    )
    with torch.device("meta"):
        model = NaViLModel(
            cfg, mcore_config, range(cfg.language.layers), pre_process=True,
            post_process=True, special_token_ids=ids, tp_group=groups.tp,
        )  # fmt: skip
    allocated = {p.device.type for p in model.parameters()} - {"meta"}
    if allocated:
        raise RuntimeError(f"meta build allocated parameters on {allocated}")

    def size(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    total = sum(p.numel() for p in model.parameters())
    experts = 2 * cfg.experts.per_modality
    idle_experts, visual_attention = 0, 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            idle_experts += p.numel()
        elif ".self_attention." in name and ".visual." in name:
            visual_attention += p.numel()
    inactive = visual_attention + idle_experts * (experts - cfg.experts.topk) // experts
    return {
        "total": total,
        "activated": total - inactive,
        "vision": size("vision_model."),
        "connector": size("mlp1."),
        "llm": total - size("vision_model.") - size("mlp1."),
    }
