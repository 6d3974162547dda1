"""``NaViLModel``: one pipeline chunk of NaViL (vision tower + embeddings on the first stage,
modality-expert decoder layers, final norm + LM head on the last stage).

Layouts (one packed sequence per micro-batch):
  input_ids, position_ids, labels   ``[t]`` int64; position ids restart at 0 in every sample
  cu_seqlens                        int32 ``[samples + 1]``: causal attention inside a sample
  patches                           ``[p, 3 * 16 * 16]`` (``ops.patchify_batch``, merge-unit order)
  patch_positions                   ``[p, 2]`` (row, col) per patch; ``vision_cu_seqlens``
                                    int32: one segment per image and scale;
  vision_window_index               ``[p]`` int64, the released code's window order (with
                                    ``VisionConfig.window_size``); ``vision_window_cu_seqlens``
                                    int32, one segment per window (``ops.vision_kwargs``)
  hidden between stages             ``[t / tp, 1, H]`` (sequence parallel) or ``[t, 1, H]``

Tokens ``<IMG_CONTEXT>`` and ``<img>`` use the visual experts. The connector's outputs replace
the ``<IMG_CONTEXT>`` embeddings in order (their count must match; in window order when the
config has one, as the released models fill them); the 12 special tokens take
their rows of the separate ``special_token_embedding`` table instead of the LLM embedding.
Labels equal to ``IGNORE_INDEX`` carry no loss (the data pipeline marks everything but text
targets so); the last stage returns the per-token loss ``[t]`` (0 where ignored).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_navil.config.model import NaViLConfig, Recompute
from megatron_navil.config.tokens import IGNORE_INDEX, SPECIAL_TOKENS, VISUAL_TOKENS
from megatron_navil.models.cp_attention import ContextParallel
from megatron_navil.models.language import (
    LayerInputs,
    ModalityDecoderLayer,
    norm_class,
    rope_tables,
)
from megatron_navil.models.modality import ModalitySplit
from megatron_navil.models.recompute import check_megatron_flags, checkpoint_full
from megatron_navil.parallel.context import local_token_index, split_problem


class LayerStack(MegatronModule):
    """This stage's decoder layers as children named by their *global* index, so parameter
    names and checkpoint keys (``layers.<i>.``) are the same in every pipeline layout. A
    MegatronModule (unlike ``nn.ModuleDict``) so checkpoint sharding recurses into the layers
    instead of treating their tensor-parallel shards as replicated tensors."""

    def __init__(self, mcore_config: Any, layers: dict[int, torch.nn.Module]) -> None:
        super().__init__(mcore_config)
        for index, layer in layers.items():
            self.add_module(str(index), layer)


class NaViLModel(MegatronModule):
    """One (virtual) pipeline stage of NaViL; build all of a rank's with :func:`build_model`.

    Args:
        cfg: the model config.
        mcore_config: megatron-core TransformerConfig of the LLM (``build.transformer_config``).
        layers: global indices of this stage's LLM layers.
        pre_process / post_process: first / last pipeline stage.
        special_token_ids: ids of the 12 special tokens (``build.special_token_ids``).
        tp_group: the LLM's tensor-parallel group (``ParallelGroups.tp``);
            ``vision_tp_group``: the vision tower's (None: ``tp_group``; or a group of one rank
            when the vision heads do not split, with ``vision_replica_group`` = the LLM's TP
            group; see ``parallel.groups.vision_groups``).
        transformer_impl: ``local`` or ``te``: the classes of the LLM's norms and experts and of
            the vision tower's linears (``models.impl``; chosen by ``build.build_model``).
        attention_backend: ``sdpa``, ``flash`` or ``torch``: the varlen attention kernel of the
            LLM and the vision tower (``models.impl.resolve_attention_backend``).
        recompute: activation recompute of the LLM layers and vision blocks
            (``config.Recompute``; None: none). megatron-core's own recompute flags in
            ``mcore_config`` must stay unset (ValueError).
        moe_path: how the FFN experts are reached (``modality.MOE_PATHS``, see
            ``modality.ModalityMoELayer``).
        cp_group: the context-parallel group (``ParallelGroups.cp``; None or one rank: no
            CP). The forward still takes the whole sequence: the first stage embeds it whole
            (the vision tower data-parallel over the CP ranks), then every stage keeps this
            rank's chunks (``parallel.context.local_token_index``), attends them against the
            gathered keys (``models.cp_attention``) and returns their per-token loss
            ``[t / cp]`` (or logits).
    """

    def __init__(
        self,
        cfg: NaViLConfig,
        mcore_config: Any,
        layers: Sequence[int],
        *,
        pre_process: bool,
        post_process: bool,
        special_token_ids: Sequence[int],
        tp_group: Any,
        vision_tp_group: Any = None,
        vision_replica_group: Any = None,
        transformer_impl: str = "local",
        recompute: Recompute | None = None,
        attention_backend: str = "sdpa",
        moe_path: str = "auto",
        vision_dp_group: Any = None,
        cp_group: Any = None,
    ) -> None:
        super().__init__(mcore_config)
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
        from megatron.core.transformer.enums import ModelType

        # Read by megatron-core's schedules and finalize_model_grads.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        if cfg.language.tie_embeddings:
            raise ValueError(
                "LanguageConfig.tie_embeddings=True is not supported (neither NaViL backbone "
                "ties its input embedding and LM head)"
            )

        lm = cfg.language
        self.cfg = cfg
        self.recompute = (recompute or Recompute()).validate()
        check_megatron_flags(mcore_config)
        self.tp_group = tp_group
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        if self.cp_group is not None and vision_dp_group is not None:
            raise ValueError(
                "context parallelism runs the vision tower data-parallel over the CP ranks; "
                "it does not combine with --vision-parallel dp (over TP)"
            )
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = bool(mcore_config.sequence_parallel)
        if len(special_token_ids) != len(SPECIAL_TOKENS):
            raise ValueError(f"special_token_ids needs {len(SPECIAL_TOKENS)} ids")
        ids = [int(i) for i in special_token_ids]
        self.register_buffer("special_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.img_context_id = ids[SPECIAL_TOKENS.index("<IMG_CONTEXT>")]
        visual = [ids[SPECIAL_TOKENS.index(tok)] for tok in VISUAL_TOKENS]
        self.register_buffer("visual_ids", torch.tensor(visual), persistent=False)
        self.input_tensor: torch.Tensor | None = None

        if pre_process:
            from megatron_navil.models.connector import Connector
            from megatron_navil.models.vision import VisionEncoder

            vision_group = vision_tp_group or self.tp_group
            self.vision_model = VisionEncoder(
                cfg.vision, mcore_config, vision_group, replica_group=vision_replica_group,
                recompute=self.recompute.vision, transformer_impl=transformer_impl,
                attention_backend=attention_backend,
            )  # fmt: skip
            self.mlp1 = Connector(
                cfg.vision.width, lm.hidden, mcore_config, vision_group,
                merge=cfg.connector.merge, norm_eps=cfg.connector.norm_eps,
                replica_group=vision_replica_group,
            )  # fmt: skip
            # --vision-parallel dp: the (unsplit) tower's images split over these ranks
            self.vision_dp_group = vision_dp_group
            if vision_dp_group is not None:
                from megatron_navil.models.vision_dp import mark_tp_summed

                mark_tp_summed(self.vision_model, self.mlp1)
            self.embedding = VocabParallelEmbedding(
                lm.vocab, lm.hidden, init_method=mcore_config.init_method, config=mcore_config,
                reduce_scatter_embeddings=False, tp_group=self.tp_group,
            )  # fmt: skip
            table = torch.empty(len(SPECIAL_TOKENS), lm.hidden, dtype=mcore_config.params_dtype)
            if mcore_config.perform_initialization:
                mcore_config.init_method(table)
            self.special_token_embedding = torch.nn.Parameter(table)
        self.layers = LayerStack(
            mcore_config,
            {
                i: ModalityDecoderLayer(
                    mcore_config,
                    lm,
                    i + 1,
                    self.tp_group,
                    transformer_impl,
                    recompute=self.recompute.llm,
                    attention_backend=attention_backend,
                    moe_path=moe_path,
                )
                for i in layers
            },
        )
        if post_process:
            self.final_layernorm = norm_class(transformer_impl)(
                config=mcore_config, hidden_size=lm.hidden, eps=lm.norm_eps
            )
            self.output_layer = ColumnParallelLinear(
                lm.hidden, lm.vocab, config=mcore_config, init_method=mcore_config.init_method,
                bias=False, gather_output=False, tp_group=self.tp_group,
            )  # fmt: skip

    def set_input_tensor(self, input_tensor: Any) -> None:
        """megatron-core's pipeline schedules hand the previous stage's output here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ------------------------------------------------------------------------------------
    def _embed(
        self,
        input_ids: torch.Tensor,
        patches: torch.Tensor | None,
        patch_positions: torch.Tensor | None,
        vision_cu_seqlens: torch.Tensor | None,
        vision_window_index: torch.Tensor | None,
        vision_window_cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[t]`` ids (+ images) -> ``[t, 1, H]`` embeddings, image features in place."""
        match = input_ids.unsqueeze(1) == self.special_ids.unsqueeze(0)  # [t, 12]
        is_special = match.any(dim=1)
        lookup = torch.where(is_special, torch.zeros_like(input_ids), input_ids)
        emb = self.embedding(lookup.unsqueeze(0)).transpose(0, 1)  # [t, 1, H]
        special = self.special_token_embedding[match.to(torch.long).argmax(dim=1)]
        emb = torch.where(is_special.view(-1, 1, 1), special.unsqueeze(1), emb)

        slots = input_ids == self.img_context_id
        n_slots = int(slots.sum())
        if patches is None:
            if n_slots:
                raise ValueError(
                    f"{n_slots} <IMG_CONTEXT> tokens in input_ids but no patches were given"
                )
            if torch.is_grad_enabled():
                emb = emb + self._vision_in_graph().to(emb.dtype)
            return emb
        if patch_positions is None or vision_cu_seqlens is None:
            raise ValueError("patches need patch_positions and vision_cu_seqlens")
        dp_group = self.vision_dp_group if self.cp_group is None else self.cp_group
        if dp_group is not None:
            from megatron_navil.models.vision_dp import encode_data_parallel

            v = self.cfg.vision
            cost = (  # a segment's vision FLOPs: per-patch matmuls, per-image attention
                6 * v.depth * (4 * v.width**2 + 2 * v.width * v.mlp),
                12 * v.depth * v.width,
            )
            features = encode_data_parallel(
                self.vision_model, self.mlp1, dp_group, patches, patch_positions,
                vision_cu_seqlens, vision_window_index, vision_window_cu_seqlens,
                self.cfg.connector.merge, cost, self.cfg.language.hidden,
                partial_grads=self.cp_group is not None,
            )  # fmt: skip
        else:
            features = self.mlp1(
                self.vision_model(
                    patches,
                    patch_positions,
                    vision_cu_seqlens,
                    vision_window_index,
                    vision_window_cu_seqlens,
                )
            )  # [n_tokens, H]
        if features.shape[0] != n_slots:
            raise ValueError(
                f"image features ({features.shape[0]} tokens from {patches.shape[0]} patches) "
                f"and <IMG_CONTEXT> tokens in input_ids ({n_slots}) differ"
            )
        emb = emb.masked_scatter(slots.view(-1, 1, 1), features.to(emb.dtype).unsqueeze(1))
        return emb

    def _vision_in_graph(self) -> torch.Tensor:
        """A zero that depends on every trainable vision and connector parameter (sums of
        empty slices): a micro-batch without images still gives them a (zero) gradient, as
        every micro-batch does on every rank. megatron-core DDP's overlapped grad reduce
        starts a bucket's reduction when all its parameters have their gradient and checks
        that the first batch gave each one; a parameter left out on some ranks would start
        its bucket's collective in another order there (mismatched collectives). Adds an
        exact 0: the numbers are unchanged."""
        parts = [self.vision_model.parameters(), self.mlp1.parameters()]
        zero = torch.zeros((), dtype=torch.float32, device=self.special_ids.device)
        for param in itertools.chain(*parts):
            if param.requires_grad:
                zero = zero + param.reshape(-1)[:0].sum()
        return zero

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        labels: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        vision_cu_seqlens: torch.Tensor | None = None,
        vision_window_index: torch.Tensor | None = None,
        vision_window_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[s, 1, H]`` (not the last stage), else the per-token loss ``[t]``
        (with ``labels``) or vocab-parallel logits ``[t, 1, V / tp]``; under context
        parallelism ``t / cp`` of this CP rank's tokens (``local_token_index`` order)."""
        from megatron.core import tensor_parallel as tpl

        t = input_ids.shape[0]
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and position_ids "
                f"{tuple(position_ids.shape)} must both be [t] (one packed sequence)"
            )
        tp = self.tp_group.size()
        cp = 1 if self.cp_group is None else self.cp_group.size()
        problem = split_problem(t, cp, tp if self.sequence_parallel else 1)
        if problem:
            raise ValueError(problem)
        visual = torch.isin(input_ids, self.visual_ids)
        index, context_parallel = None, None
        if self.cp_group is not None:  # keep this CP rank's chunks of the whole sequence
            index = local_token_index(t, cp, self.cp_group.rank(), input_ids.device)
            visual, position_ids = visual[index], position_ids[index]
            if labels is not None:
                labels = labels[index]
            context_parallel = ContextParallel.of(self.cp_group, cu_seqlens, t)
        t_local = t // cp
        s = t_local // tp if self.sequence_parallel else t_local
        rank = self.tp_group.rank() if self.sequence_parallel else 0
        lm = self.cfg.language
        cos, sin = rope_tables(position_ids, lm.head_dim, lm.rope_theta)
        inputs = LayerInputs(
            split=ModalitySplit.from_mask(visual),
            visual_mask_local=visual[rank * s : (rank + 1) * s].view(s, 1),
            cos=cos,
            sin=sin,
            cu_seqlens=cu_seqlens,
            context_parallel=context_parallel,
        )

        if self.pre_process:
            hidden = self._embed(
                input_ids,
                patches,
                patch_positions,
                vision_cu_seqlens,
                vision_window_index,
                vision_window_cu_seqlens,
            )
            if index is not None:
                hidden = hidden.index_select(0, index)
            if self.sequence_parallel:
                hidden = tpl.scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
        else:
            if self.input_tensor is None:
                raise ValueError("a non-first pipeline stage needs set_input_tensor() first")
            hidden = self.input_tensor
        full = self.recompute.llm == "full"
        for layer in self.layers.children():
            if full:  # keep only the layer's input; `inputs` is shared, closed over
                hidden = checkpoint_full(functools.partial(layer, inputs=inputs), hidden)
            else:
                hidden = layer(hidden, inputs)
        if not self.post_process:
            return hidden

        hidden = self.final_layernorm(hidden)
        logits, _ = self.output_layer(hidden)  # [t, 1, V / tp] (gathers under SP)
        if labels is None:
            return logits
        return self._loss(logits, labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpl

        vocab = self.cfg.language.vocab
        ignore = labels == IGNORE_INDEX
        bad = ~ignore & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(
                f"label {int(labels[first])} at position {first} is outside the LM head's "
                f"vocabulary [0, {vocab}) (use {IGNORE_INDEX} for positions without loss)"
            )
        safe = torch.where(ignore, torch.zeros_like(labels), labels)
        per_token = tpl.vocab_parallel_cross_entropy(logits.float(), safe.view(-1, 1))
        return per_token.view(-1).masked_fill(ignore, 0.0)
