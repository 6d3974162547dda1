"""Which implementation runs the model's layers and its attention: the one place they are
chosen (``--transformer-impl``, ``--attention-backend``).

Transformer implementations (megatron-core's backend spec providers):

* ``local``: megatron-core's torch modules (``ColumnParallelLinear``, ``WrappedTorchNorm``,
  ``SequentialMLP`` experts). Runs everywhere; the CPU path.
* ``te``: TransformerEngine through megatron-core's ``TESpecProvider``: ``TENorm`` for every
  RMSNorm of the LLM, TE grouped-GEMM experts (``TEGroupedMLP``) for the FFN, and
  ``TEColumnParallelLinear`` / ``TERowParallelLinear`` for the vision tower's qkv/proj/fc1/fc2.
  The LLM's attention projections stay megatron-core parameters applied per modality block
  with ``F.linear`` between one sequence-parallel all-gather and one reduce-scatter
  (models/language.py): TE's parallel linears do their own TP communication per call, which
  would gather twice per layer. No fused LayerNorm+Linear: in the LLM each norm feeds two
  modality projections (or the MoE router), and in the vision tower the norm is recomputed on
  its own under selective recompute, so a fused norm would need two tied copies of its weight.
  Parameter names are the same in both (see :func:`map_state_dict` for the experts).
* ``auto``: ``te`` when TransformerEngine imports and a GPU is present, else ``local``.

Attention backends (models/attention.py runs them):

* ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16).
* ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; CUDA only: it calls
  ``aten::_flash_attention_forward``, which has no CPU kernel; fp16/bf16).
* ``sdpa``: the bucketed ``scaled_dot_product_attention`` (every device and dtype).
* ``auto``: the first of flash, torch, sdpa that can run on the device and dtype.

Asking for something that cannot run raises :class:`BackendUnavailable` with one line naming
what is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from typing import Any

import torch

TRANSFORMER_IMPLS = ("local", "te")
ATTENTION_BACKENDS = ("flash", "torch", "sdpa")


class BackendUnavailable(ValueError):
    """A requested implementation or attention backend cannot run here (one line)."""


@functools.cache
def _imports(module: str) -> str | None:
    """None when ``module`` imports, else why not (``ExcType: message``, first line)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # broken CUDA builds raise OSError / RuntimeError too
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def te_problem(cuda: bool, *, try_import: bool = True) -> str | None:
    """Why TransformerEngine cannot be used, or None. ``try_import=False`` only looks the
    package up (``python -m megatron_navil.env`` never imports GPU libraries)."""
    if not cuda:
        return "TransformerEngine needs a CUDA GPU (none is available)"
    if not try_import:
        found = importlib.util.find_spec("transformer_engine") is not None
        return None if found else "transformer_engine is not installed"
    why = _imports("transformer_engine.pytorch")
    return None if why is None else f"transformer_engine does not import ({why})"


def attention_problem(
    backend: str, cuda: bool, dtype: torch.dtype, *, try_import: bool = True
) -> str | None:
    """Why attention ``backend`` cannot run on this device (``cuda``) in ``dtype``, or None."""
    if backend == "sdpa":
        return None
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        if try_import:
            why = _imports("flash_attn")
            if why is not None:
                return f"flash-attn's varlen kernel is unavailable: flash_attn {why}"
        elif importlib.util.find_spec("flash_attn") is None:
            return "flash-attn's varlen kernel is unavailable: flash_attn not installed"
        problem = None
    else:  # torch
        problem = (
            None
            if _torch_varlen() is not None
            else (
                f"torch.nn.attention.varlen.varlen_attn is missing in torch {torch.__version__} "
                "(needs >= 2.10)"
            )
        )
    if problem is None and not cuda:
        problem = f"the {backend} varlen attention backend needs a CUDA GPU (none is available)"
    if problem is None and not half:
        problem = f"the {backend} varlen attention backend needs fp16/bf16, the model is {dtype}"
    return problem


def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve_transformer_impl(requested: str, cuda: bool, *, try_import: bool = True) -> str:
    """``local`` or ``te`` for ``requested`` in ``auto``/``local``/``te``; ``te`` asked for
    where it cannot run raises :class:`BackendUnavailable`."""
    if requested not in ("auto", *TRANSFORMER_IMPLS):
        raise ValueError(
            f"transformer_impl must be one of {('auto', *TRANSFORMER_IMPLS)}, got {requested!r}"
        )
    if requested == "local":
        return "local"
    problem = te_problem(cuda, try_import=try_import)
    if requested == "te" and problem is not None:
        raise BackendUnavailable(f"--transformer-impl te: {problem}")
    return "te" if problem is None else "local"


def resolve_attention_backend(
    requested: str, cuda: bool, dtype: torch.dtype, *, try_import: bool = True
) -> str:
    """``flash``, ``torch`` or ``sdpa`` for ``requested`` (``auto`` takes the first that can
    run, in that order); an explicit backend that cannot run raises
    :class:`BackendUnavailable`."""
    if requested == "auto":
        for backend in ATTENTION_BACKENDS:
            if attention_problem(backend, cuda, dtype, try_import=try_import) is None:
                return backend
    problem = attention_problem(requested, cuda, dtype, try_import=try_import)
    if problem is not None:
        raise BackendUnavailable(f"--attention-backend {requested}: {problem}")
    return requested


def spec_provider(transformer_impl: str) -> Any:
    """megatron-core's backend spec provider for ``transformer_impl`` (``local`` or ``te``):
    the object every layer asks for its linear, norm and expert classes."""
    if transformer_impl == "local":
        from megatron.core.models.backends import LocalSpecProvider

        return LocalSpecProvider()
    if transformer_impl == "te":
        problem = _imports("transformer_engine.pytorch")
        if problem is not None:  # megatron-core would hand out MagicMock classes
            raise BackendUnavailable(f"transformer_impl 'te': transformer_engine {problem}")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(
        f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}"
    )


# ---------------------------------------------------------------------------------------------
# State-dict names across implementations (torch ``state_dict()``; the dist-checkpoint keys
# are already the same: megatron-core's TEGroupedMLP.sharded_state_dict is "interchangeable
# with SequentialMLP's").

_LOCAL_EXPERT = re.compile(
    r"^(?P<pre>.*\.experts\.)local_experts\.(?P<i>\d+)\.(?P<fc>linear_fc[12])\.(?P<p>weight|bias)$"
)
_TE_EXPERT = re.compile(
    r"^(?P<pre>.*\.experts\.)(?P<fc>linear_fc[12])\.(?P<p>weight|bias)(?P<i>\d+)$"
)


def _rename(name: str, target: str) -> str:
    if target == "te":
        m = _LOCAL_EXPERT.match(name)
        return f"{m['pre']}{m['fc']}.{m['p']}{m['i']}" if m else name
    m = _TE_EXPERT.match(name)
    return f"{m['pre']}local_experts.{m['i']}.{m['fc']}.{m['p']}" if m else name


def map_state_dict(state_dict: dict[str, Any], target: str) -> dict[str, Any]:
    """A model ``state_dict`` of either implementation renamed for a model of ``target``
    (``local`` or ``te``); tensors are the same objects (nothing is copied).

    The one naming difference is the FFN experts: ``SequentialMLP`` holds
    ``...mlp.experts.local_experts.{i}.linear_fc{1,2}.weight``, ``TEGroupedMLP``
    ``...mlp.experts.linear_fc{1,2}.weight{i}`` (same ``[out, in]`` tensor per expert).
    ``_extra_state`` entries are dropped: TE's holds FP8 scaling metadata that means nothing
    to another implementation (load the result with ``strict=False`` for them). Everything
    else (norms, linears, the vision tower) has the same names in both."""
    if target not in TRANSFORMER_IMPLS:
        raise ValueError(f"target must be one of {TRANSFORMER_IMPLS}, got {target!r}")
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        if name.endswith("_extra_state"):
            continue
        new = _rename(name, target)
        if new in out:
            raise ValueError(f"map_state_dict: two entries map to {new!r}")
        out[new] = value
    return out
