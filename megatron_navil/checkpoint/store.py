"""Saving and loading checkpoints through megatron-core dist-checkpointing, written
atomically, last K kept (the save directory's layout: ``checkpoint.directory``).

A save goes to ``iter_N.tmp`` and is renamed to ``iter_N`` by rank 0 after every rank has
written (rename is atomic on POSIX file systems), so a crash at any point leaves either the
previous complete checkpoint or the new one, never a half-written directory that looks done.
With ``async_saves`` (``--async-save``, ``checkpoint.async_save``) the shards are written by a
forked process while training goes on, and ``train_state.json``, the rename and the marker
follow only when every rank's writer has finished.
Model and optimizer are saved in megatron-core's ``fully_reshardable`` form, so a checkpoint
loads at another TP/PP/EP/DP layout and with either optimizer (the distributed one, or the
plain one used at DP = 1: ``sharded_state``); megatron-core limitation: a MoE optimizer saved
at EP > 1 does not load at EP = 1. :func:`load_weights` loads the model alone: how a stage
starts from the previous stage's result.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_navil.checkpoint.async_save import AsyncSaves
from megatron_navil.checkpoint.directory import (
    MARKER,
    TRAIN_STATE,
    complete_iterations,
    iteration_dir,
    require_complete,
)
from megatron_navil.checkpoint.errors import CheckpointError, CheckpointLayoutError
from megatron_navil.config.io import write_config

SAVE_DELAY_ENV = "MEGATRON_NAVIL_TEST_SAVE_DELAY"
"""Seconds each save sleeps after writing the model and optimizer shards, before the RNG
states, ``train_state.json`` and the rename (tests kill -9 a run inside that window)."""


OPTIMIZER_FORMAT = "optimizer_format"
"""A checkpoint's entry naming the optimizer that saved it: ``distributed`` (megatron-core's
DistributedOptimizer, ``fully_reshardable``) or ``plain`` (its Float16/FP32 optimizer, used at
DP = 1); checkpoints without it are ``distributed`` (the only kind before the plain one)."""

_FP32_PARAM, _PARAM = "optimizer.state.fp32_param.", "optimizer.state.param."


def sharded_state(
    chunks: list[Any], optimizer: Any, is_loading: bool, saved_format: str | None = None
) -> dict[str, Any]:
    """Model chunks (``model`` / ``model0..``) and optimizer as Megatron-LM lays them out
    (the optimizer's state of partly frozen stacked tensors: :func:`optimizer_template`).
    Both optimizers name their tensors the same (:func:`_align_plain`), so a checkpoint of
    either loads into the other; ``saved_format`` (loading: the checkpoint's
    :data:`OPTIMIZER_FORMAT`) leaves out what that checkpoint does not hold. Collective when
    there is an optimizer."""
    state: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        state["model" if len(chunks) == 1 else f"model{i}"] = module.sharded_state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            optimizer_template(dict(state)),
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
        kind = optimizer_format(optimizer)
        state[OPTIMIZER_FORMAT] = kind
        parts = _parts(optimizer, state["optimizer"])
        for sub, sub_state in parts:
            if kind == "plain":
                _align_plain(sub_state)
            elif saved_format == "plain" and not sub.config.bf16:
                _drop_fp32_params(sub_state)
        if kind == "plain":
            _share_step([part for _, part in parts])
    return state


def _plain_inner(sub_state: dict[str, Any]) -> dict[str, Any]:
    """The torch optimizer's part of a plain optimizer's state: megatron-core's Float16
    optimizer nests it under ``optimizer``, its FP32 optimizer is that part."""
    return sub_state["optimizer"] if "fp32_from_fp16_params" in sub_state else sub_state


def _share_step(parts: list[dict[str, Any]]) -> None:
    """Adam's step in every plain optimizer of a chain (megatron-core saves it as
    ``common_step``, read from the optimizer's per-parameter states). An optimizer that holds
    no parameter on this rank (stage S1.1 at EP=2: the rank of the frozen text experts) has
    none, and rank 0's copy is the one the checkpoint keeps: give it the chain's step, which
    all optimizers of a chain share (megatron-core synchronises them)."""
    steps = [inner["state"]["common_step"] for inner in map(_plain_inner, parts)
             if "common_step" in inner.get("state", {})]  # fmt: skip
    if not steps:
        return
    for inner in map(_plain_inner, parts):
        inner.setdefault("state", {}).setdefault("common_step", steps[0])


def optimizer_format(optimizer: Any) -> str:
    """``distributed`` or ``plain`` (:data:`OPTIMIZER_FORMAT`)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if isinstance(subs[0], DistributedOptimizer) else "plain"


def _parts(optimizer: Any, state: Any) -> list[tuple[Any, dict[str, Any]]]:
    """(sub-optimizer, its part of ``state``) of a megatron-core optimizer: a ChainedOptimizer
    of one optimizer lays out that optimizer's state, of several ``{index: state}``."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(subs[0], state)] if len(subs) == 1 else [(sub, state[i]) for i, sub in enumerate(subs)]


def _align_plain(sub_state: dict[str, Any]) -> None:
    """The plain bf16 optimizer's fp32 master weights under the distributed optimizer's
    name: megatron-core keys them ``optimizer.state.fp32_param.<key>`` in the first and
    ``optimizer.state.param.<key>`` in the second (``fully_reshardable``); Adam's moments are
    ``optimizer.state.exp_avg(_sq).<key>`` in both (model-space tensors of the parameter's
    shape, each sharded like its parameter). The plain fp32 optimizer has no master copy (the
    parameter is its own)."""
    from dataclasses import replace

    groups = sub_state.get("fp32_from_fp16_params")
    if groups is None:
        return
    sub_state["fp32_from_fp16_params"] = [
        [replace(t, key=t.key.replace(_FP32_PARAM, _PARAM, 1)) for t in group] for group in groups
    ]


def _drop_fp32_params(sub_state: dict[str, Any]) -> None:
    """Loading a plain fp32 checkpoint into the distributed optimizer: leave its master
    weights out of the request (the checkpoint has none). In fp32 they are views of the
    parameters, which the model's own entries load."""
    for tensors in (sub_state.get("param_state") or {}).values():
        tensors.pop("param", None)


def _load_across_formats(optimizer: Any, loaded: Any, saved_format: str) -> Any:
    """The optimizer's part of a loaded checkpoint as ``optimizer.load_state_dict`` takes it,
    when another kind of optimizer saved it (:data:`OPTIMIZER_FORMAT`). dist-checkpointing
    returns the checkpoint's own non-tensor entries merged with the tensors asked for, so
    the tensors are already this optimizer's; the rest (param groups, Adam's step) is
    rebuilt from this optimizer's own state with the saved step: learning rate and weight
    decay are the scheduler's, set again when it loads."""
    for sub, part in _parts(optimizer, loaded):
        if saved_format == "plain":  # into the distributed optimizer
            inner = part.get("optimizer", part)  # Float16: {"optimizer": {...}}; FP32: {...}
            step = inner.get("state", {}).get("common_step", 0)
            own = sub.state_dict()["optimizer"]
            for group in own["param_groups"]:
                if "step" in group or not _apex_or_te():
                    group["step"] = float(step) if torch.is_tensor(step) else step
            for key in list(part):
                if key not in ("param_state", "grad_scaler"):
                    del part[key]
            part.update(optimizer=own, param_state_sharding_type="fully_reshardable")
        else:  # a distributed checkpoint into the plain optimizer
            steps = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
            step = max(steps) if steps else 0
            own = sub.state_dict()
            own_inner = own.get("optimizer", own)
            target = part["optimizer"] if "fp32_from_fp16_params" in own else part
            target["param_groups"] = own_inner["param_groups"]
            target.setdefault("state", {})["common_step"] = torch.tensor(float(step))
            part.pop("param_state_sharding_type", None)
            if target is part:  # FP32: the saved {"optimizer": {param_groups}} is not its
                part.pop("optimizer", None)
    return loaded


def _apex_or_te() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return bool(distrib_optimizer.HAVE_APEX_OR_TE)


def _stacked(sh: Any) -> list[Any]:
    """The ShardedTensors of a model entry (a factory's built ones) that carry prepended
    axes: megatron-core's stacked tensors, one global tensor over the experts (and, in its
    GPT model, the layers), whose prepended offsets are the global expert (layer) index."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        built = sh.build()
        tensors = list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
    elif isinstance(sh, ShardedTensor):
        tensors = [sh]
    else:
        return []
    return [t for t in tensors if isinstance(t, ShardedTensor) and t.prepend_axis_num > 0]


def optimizer_template(model_state: dict[str, Any]) -> dict[str, Any]:
    """The model's sharded state as the optimizer's template: the same, except for stacked
    tensors (one global tensor over the experts, each rank writing its experts' slices) whose
    experts are partly frozen, as the text experts are in stages S1.1 and S1.2. Frozen
    parameters have no optimizer state, so their slices of the optimizer's copy would never
    be written (megatron-core refuses the save: "Invalid access pattern"). For such a tensor
    the optimizer's copy stacks the trainable slices only, in global order: along each
    prepended axis, index ``g`` becomes ``trainable.index(g)`` of ``len(trainable)`` (NaViL:
    the visual expert alone, slice 0 of 1), the same at every layout. Tensors whose slices
    all train (stage S2) are untouched. Collective: which slices train is gathered from every
    rank (expert parallelism splits them). ValueError when the trainable slices of a tensor
    do not form a grid (nothing megatron-core can stack)."""
    from dataclasses import replace
    from itertools import product

    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    local = [
        (sh.key, t.global_offset[: t.prepend_axis_num], bool(sh.data.requires_grad))
        for sh in nested_values(model_state)
        for t in _stacked(sh)
    ]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    trains: dict[str, set[tuple[int, ...]]] = {}
    frozen: dict[str, set[tuple[int, ...]]] = {}
    for key, slot, grad in (x for part in gathered for x in part):
        (trains if grad else frozen).setdefault(key, set()).add(tuple(slot))
    axes: dict[str, list[list[int]]] = {}  # per partly frozen key: its trainable indices per axis
    for key, slots in trains.items():
        if key not in frozen:
            continue
        per_axis = [sorted({s[a] for s in slots}) for a in range(len(next(iter(slots))))]
        if set(product(*per_axis)) != slots:
            raise ValueError(f"{key}: its trainable slices {sorted(slots)} are not a grid")
        axes[key] = per_axis
    if not axes:
        return model_state

    def stack_trainable(t: Any, per_axis: list[list[int]]) -> Any:
        n = len(per_axis)
        sizes = tuple(len(kept) for kept in per_axis)
        index = tuple(kept.index(t.global_offset[a]) for a, kept in enumerate(per_axis))
        return replace(
            t,
            global_shape=sizes + t.global_shape[n:],
            global_offset=index + t.global_offset[n:],
            axis_fragmentations=sizes + t.axis_fragmentations[n:],
        )

    def remap(sh: Any) -> Any:
        per_axis = axes.get(getattr(sh, "key", None))
        if per_axis is None or not sh.data.requires_grad:
            return sh
        if isinstance(sh, ShardedTensor):
            return stack_trainable(sh, per_axis)
        if isinstance(sh, ShardedTensorFactory):
            build = sh.build_fn

            def build_fn(*args: Any, _build: Any = build, _axes: list = per_axis) -> Any:
                def one(t: Any) -> Any:
                    stacked = isinstance(t, ShardedTensor) and t.prepend_axis_num > 0
                    return stack_trainable(t, _axes) if stacked else t

                return dict_list_map_outplace(one, _build(*args))

            return replace(sh, build_fn=build_fn)
        return sh

    return dict_list_map_outplace(remap, model_state)


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and strings only, so that it is saved and
    loaded without pickle (``torch.load(weights_only=True)``): numpy's and Python's states are
    tuples of ints, written out as int64 tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_rng(path: Path) -> dict[str, Any]:
    """A rank's RNG file, loaded without running any code from it (``weights_only=True``: only
    tensors and plain containers); anything else (a pickled object, as in files written before
    this format, or planted) is a CheckpointError."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError variants
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a plain-tensor RNG state ({first[:200]}); refusing to unpickle it "
            "(a checkpoint from before this format: start from its weights with --init)"
        ) from None


def save(
    directory: str | Path,
    iteration: int,
    chunks: list[Any],
    optimizer: Any,
    train_state: dict[str, Any],
    keep_last: int | None = None,
    model_config: Any = None,
    async_saves: AsyncSaves | None = None,
) -> Path:
    """Save model, optimizer, RNG and ``train_state`` (JSON: scheduler, sampler, ...) as
    ``iter_<iteration>``; keep the newest ``keep_last`` complete checkpoints. ``model_config``
    (a NaViLConfig or its dict) goes in as ``navil_config.json``, so that tools can name the
    checkpoint instead of a config (``checkpoint.config.resolve_config``). Collective.

    ``async_saves``: write the model and optimizer shards in the background
    (``checkpoint.async_save``) and return once they are scheduled; the RNG states and
    ``train_state`` are those of this call, and the checkpoint becomes complete (renamed,
    marker written, old ones pruned) when ``async_saves`` finalizes it after every rank's
    writer is done. A pending save is finalized first."""
    from megatron.core import dist_checkpointing

    if async_saves is not None:
        async_saves.wait()  # its completion prunes .tmp directories: before ours exists
    rank = torch.distributed.get_rank()
    root = Path(directory)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a crashed save of the same iteration
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # empty: megatron-core warns about non-empty directories
    torch.distributed.barrier()
    # Serialised now: the state of this call, whenever the checkpoint is completed.
    payload = json.dumps({"iteration": iteration, **train_state}, indent=2, sort_keys=True)
    complete = functools.partial(_complete, root, iteration, payload, model_config, keep_last)
    state = sharded_state(chunks, optimizer, is_loading=False)
    if async_saves is not None:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        _write_rng(tmp, rank)
        request.add_finalize_fn(complete)
        async_saves.schedule(request, iteration)
        return final
    dist_checkpointing.save(state, str(tmp))
    if delay := float(os.environ.get(SAVE_DELAY_ENV, "0") or 0):
        time.sleep(delay)  # fault injection: a kill now lands in a half-written checkpoint
    _write_rng(tmp, rank)
    complete()
    return final


def _write_rng(tmp: Path, rank: int) -> None:
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def _complete(
    root: Path, iteration: int, payload: str, model_config: Any, keep_last: int | None
) -> None:
    """Make ``iter_<iteration>.tmp``, whose shards and RNG states every rank has written,
    the complete ``iter_<iteration>``: ``train_state.json`` (what marks it complete) and the
    config, the atomic rename, the marker, then pruning to ``keep_last`` and removing crashed
    saves' ``.tmp`` directories (no other save is in flight). Collective."""
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = torch.distributed.get_rank()
    if rank == 0:
        (tmp / TRAIN_STATE).write_text(payload)
        if model_config is not None:
            write_config(tmp, model_config)
    torch.distributed.barrier()  # every rank has written its part
    if rank == 0:
        if final.exists():  # re-saving an iteration (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / (MARKER + ".tmp")
        marker_tmp.write_text(str(iteration))
        os.replace(marker_tmp, root / MARKER)
        if keep_last is not None:
            for old in complete_iterations(root)[:-keep_last]:
                shutil.rmtree(iteration_dir(root, old))
        for stale in root.glob("iter_*.tmp"):  # crashed saves of other iterations
            shutil.rmtree(stale, ignore_errors=True)
    torch.distributed.barrier()


def _drop_unsaved_extra_state(state: dict[str, Any], path: Path) -> dict[str, set[str]]:
    """Remove from the model entries of ``state`` (a :func:`sharded_state`) the
    ``_extra_state`` objects the checkpoint at ``path`` does not hold; returns the removed
    state-dict names per entry.

    Why: a TransformerEngine module (``--transformer-impl te``: its norms, grouped experts,
    linears) has an ``_extra_state`` (FP8 scaling metadata) where megatron-core's torch module
    has none, so a checkpoint saved by the other implementation lacks it; the weights
    themselves have the same keys (models/impl.py). Such a module keeps its fresh extra
    state. Nothing else is forgiven: a missing weight still fails the load."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    wanted = [
        (entry, name)
        for entry, sharded in state.items()
        if entry.startswith("model")
        for name, item in sharded.items()
        if isinstance(item, ShardedObject) and item.key.endswith("_extra_state")
    ]
    if not wanted:
        return {}
    # Objects are listed by unique key, "<key>/shard_<offset>_<shape>".
    saved = {key.split("/shard_")[0] for key in load_sharded_metadata(str(path))}
    dropped: dict[str, set[str]] = {}
    for entry, name in wanted:
        if state[entry][name].key not in saved:
            del state[entry][name]
            dropped.setdefault(entry, set()).add(name)
    return dropped


def _load_model_entries(
    chunks: list[Any], loaded: dict[str, Any], dropped: dict[str, set[str]]
) -> None:
    """``load_state_dict`` of each chunk's entry; strict except for the ``_extra_state``
    entries :func:`_drop_unsaved_extra_state` removed."""
    for i, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        entry = "model" if len(chunks) == 1 else f"model{i}"
        skip = dropped.get(entry, set())
        result = module.load_state_dict(loaded[entry], strict=not skip)
        if skip and (set(result.missing_keys) - skip or result.unexpected_keys):
            raise CheckpointError(
                f"loading {entry}: missing {sorted(set(result.missing_keys) - skip)}, "
                f"unexpected {sorted(result.unexpected_keys)}"
            )


def load_weights(path: str | Path, chunks: list[Any]) -> None:
    """Load only the model weights of the complete checkpoint ``path`` into ``chunks`` (any
    layout; the optimizer, RNG and ``train_state`` are left alone): how a training stage
    starts from the previous stage's result. Collective."""
    path = require_complete(path)
    from megatron.core import dist_checkpointing

    state = sharded_state(chunks, None, is_loading=True)
    dropped = _drop_unsaved_extra_state(state, path)
    _load_model_entries(chunks, dist_checkpointing.load(state, str(path)), dropped)


_MISSING_OPTIMIZER_KEY = re.compile(
    r"(chained_\d+\.)?optimizer\.state\.\S+ from model not in state dict"
)


def load(path: str | Path, chunks: list[Any], optimizer: Any) -> dict[str, Any]:
    """Load a complete checkpoint into ``chunks`` / ``optimizer`` (any layout); restore this
    rank's RNG when the checkpoint has one for it (same world size); return ``train_state``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    path = require_complete(path)
    saved_format = None
    if optimizer is not None:
        common = dist_checkpointing.load_common_state_dict(str(path))
        saved_format = common.get(OPTIMIZER_FORMAT, "distributed")
    state = sharded_state(chunks, optimizer, is_loading=True, saved_format=saved_format)
    dropped = _drop_unsaved_extra_state(state, path)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as exc:  # the latter wraps each rank's KeyError
        causes = getattr(exc, "failures", {}).values()  # CheckpointException: rank -> error
        missing = _MISSING_OPTIMIZER_KEY.search(" ".join(map(str, [exc, *causes])))
        if optimizer is None or missing is None:
            raise
        # megatron-core 0.16.1 keeps one optimizer per expert/non-expert parameter set when
        # EP > 1 (a ChainedOptimizer, keys "chained_N.optimizer...") and one when EP = 1;
        # their states do not map onto each other, and its KeyError lists every key.
        wanted_chained = missing.group(1) is not None
        raise CheckpointLayoutError(
            f"{path}: its optimizer state was saved with expert parallelism "
            f"{'= 1' if wanted_chained else '> 1'} and cannot be resumed at this "
            "expert-parallel size (a megatron-core limitation for MoE optimizer states); "
            "resume at the saved --ep, or start from its weights with --init"
        ) from None
    _load_model_entries(chunks, loaded, dropped)
    if optimizer is not None:
        state = loaded["optimizer"]
        if saved_format != optimizer_format(optimizer):
            state = _load_across_formats(optimizer, state, saved_format)
        optimizer.load_state_dict(state)
    rng = path / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt"
    saved_ranks = len(list((path / "rng").glob("rank_*.pt")))
    if rng.is_file() and saved_ranks == torch.distributed.get_world_size():
        _set_rng_state(_load_rng(rng))
    return json.loads((path / TRAIN_STATE).read_text())
