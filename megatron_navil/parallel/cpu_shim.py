"""Make megatron-core 0.16.1 run on CPU with torch.distributed's gloo backend.

megatron-core assumes CUDA in a handful of places. Each assumption is patched here by one small,
named, reversible :class:`Patch`, applied only when ``torch.cuda.is_available()`` is False (the
patches marked ``always`` fix upstream bugs that bite GPU installs too and are applied
everywhere). Every patch states what megatron-core assumes, where, and why the replacement
is exact on CPU; ``tests/distributed/test_cpu_shim.py`` shows each one necessary by disabling it
alone.

Disable patches by name with ``apply(disable=[...])`` or the environment variable
``MEGATRON_NAVIL_SHIM_DISABLE=name1,name2`` (read by :func:`apply`).

The shim is written against exactly ``megatron-core==0.16.1``; :func:`apply` refuses another
version rather than patch code it has not read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_navil import MCORE_VERSION

DISABLE_ENV = "MEGATRON_NAVIL_SHIM_DISABLE"
CPU = torch.device("cpu")


@dataclass
class Patch:
    """One targeted replacement of megatron-core (or torch) behaviour.

    ``install`` performs the replacement through the ``setattr`` callback it is given, so that
    every original can be restored by :meth:`revert`.
    """

    name: str
    assumes: str
    where: str
    why_safe: str
    install: Callable[[Callable[[Any, str, Any], None]], None]
    always: bool = False  # applied with CUDA too (upstream bugs, not CUDA assumptions)
    _saved: list[tuple[Any, str, Any, bool]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def apply(self) -> None:
        if self.active:
            return

        def _set(obj: Any, attr: str, value: Any) -> None:
            # Save the raw attribute (a classmethod/staticmethod object, not what getattr
            # binds) so revert restores exactly what was there, or deletes what was inherited.
            own = vars(obj)
            self._saved.append((obj, attr, own.get(attr), attr in own))
            setattr(obj, attr, value)

        self.install(_set)

    def revert(self) -> None:
        for obj, attr, old, had in reversed(self._saved):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._saved.clear()


PATCHES: dict[str, Patch] = {}


def _patch(name: str, *, assumes: str, where: str, why_safe: str, always: bool = False):
    def deco(fn: Callable[[Callable[[Any, str, Any], None]], None]):
        PATCHES[name] = Patch(name, assumes, where, why_safe, fn, always)
        return fn

    return deco


def _mod(name: str) -> Any:
    return importlib.import_module(f"megatron.core.{name}")


# --------------------------------------------------------------------------------------------
# rng
# --------------------------------------------------------------------------------------------
def _cpu_rng_tracker_class() -> type:
    random = _mod("tensor_parallel.random")

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        """megatron's model-parallel RNG tracker over the CPU default generator.

        ``add`` seeds a named state and ``fork`` swaps it in and out of ``torch``'s default
        generator, exactly what the CUDA tracker does with the CUDA generator.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    return CpuRNGStatesTracker


@_patch(
    "rng",
    assumes="the model-parallel RNG tracker forks CUDA generator states "
    "(torch.cuda.get_rng_state, torch.cuda.manual_seed, _get/_set_cuda_rng_state)",
    where="tensor_parallel/random.py: CudaRNGStatesTracker, _get/_set_cuda_rng_state, "
    "model_parallel_cuda_manual_seed",
    why_safe="on CPU every random op uses the CPU default generator, so forking that "
    "generator's state is exactly what the tracker does for CUDA",
)
def _rng(set_: Callable) -> None:
    random = _mod("tensor_parallel.random")
    set_(random, "CudaRNGStatesTracker", _cpu_rng_tracker_class())
    set_(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    set_(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    seed_all = random.model_parallel_cuda_manual_seed

    def model_parallel_cuda_manual_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        # megatron seeds the device's default generator with `seed` (torch.cuda.manual_seed,
        # silently deferred forever without CUDA); on CPU that generator is torch's default.
        seed_all(seed, *args, **kwargs)
        torch.manual_seed(seed)

    set_(random, "model_parallel_cuda_manual_seed", model_parallel_cuda_manual_seed)
    tensor_parallel = _mod("tensor_parallel")
    set_(tensor_parallel, "model_parallel_cuda_manual_seed", model_parallel_cuda_manual_seed)
    random.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# current_device
# --------------------------------------------------------------------------------------------
@_patch(
    "current_device",
    assumes="torch.cuda.current_device() names the device for new tensors and buffers",
    where="~175 call sites: tensor_parallel (layers, mappings, data, memory buffer), rotary "
    "embeddings, p2p_communication, DDP param/grad buffers, optimizers",
    why_safe="it is only installed while CUDA is unavailable, when the only device is the CPU",
)
def _current_device(set_: Callable) -> None:
    set_(torch.cuda, "current_device", lambda: CPU)


# --------------------------------------------------------------------------------------------
# cuda_literals
# --------------------------------------------------------------------------------------------
class _CpuFactoryTorch:
    """A stand-in for the ``torch`` module seen by one megatron module: tensor factories that
    are asked for a CUDA device get the CPU; everything else is torch itself."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like")

    def __init__(self) -> None:
        for fn_name in self._FACTORIES:
            setattr(self, fn_name, self._wrap(getattr(torch, fn_name)))

    @staticmethod
    def _wrap(fn: Callable) -> Callable:
        def factory(*args: Any, **kwargs: Any) -> Any:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = CPU
                kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CUDA_LITERAL_MODULES = (
    "pipeline_parallel.schedules",
    "optimizer.optimizer",
    "optimizer.clip_grads",
    "utils",
)


@_patch(
    "cuda_literals",
    assumes='tensor factories hard-code device="cuda" (the token counter of every pipeline '
    "schedule, found_inf / scale buffers, grad-norm buffers)",
    where="pipeline_parallel/schedules.py (hit even at PP=1), optimizer/optimizer.py, "
    "optimizer/clip_grads.py, core/utils.py",
    why_safe="only those modules see a torch whose factories map a CUDA device to the CPU, "
    "the one device there is",
)
def _cuda_literals(set_: Callable) -> None:
    proxy = _CpuFactoryTorch()
    for name in _CUDA_LITERAL_MODULES:
        set_(_mod(name), "torch", proxy)


# --------------------------------------------------------------------------------------------
# cuda_streams
# --------------------------------------------------------------------------------------------
class _SyncStream:
    """A CUDA stream/event stand-in. CPU kernels run synchronously in program order, so
    waiting, recording and synchronising are all already satisfied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _SyncStream:
        return event if event is not None else _SyncStream()

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _SyncStream()


@_patch(
    "cuda_streams",
    assumes="torch.cuda.Stream / Event / current_stream / stream / synchronize exist",
    where="MoE all-to-all dispatcher (its device-to-host side stream), p2p_communication "
    "(torch.cuda.synchronize after batched p2p)",
    why_safe="CPU execution is synchronous and in order, so every wait and sync is a no-op",
)
def _cuda_streams(set_: Callable) -> None:
    set_(torch.cuda, "Stream", _SyncStream)
    set_(torch.cuda, "Event", _SyncStream)
    set_(torch.cuda, "current_stream", lambda *a, **k: _DEFAULT_STREAM)
    set_(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    set_(torch.cuda, "synchronize", lambda *a, **k: None)


# --------------------------------------------------------------------------------------------
# torch_norm_sp
# --------------------------------------------------------------------------------------------
@_patch(
    "torch_norm_sp",
    assumes="WrappedTorchNorm (the norm of the local layer spec without apex/TE) refuses "
    "config.sequence_parallel=True",
    where="transformer/torch_norm.py: WrappedTorchNorm.__new__",
    why_safe="a norm is token-wise, so under sequence parallelism it needs no communication; "
    "its weights are marked `sequence_parallel` so DDP all-reduces their grads over TP, "
    "exactly what megatron's own fused norms do",
)
def _torch_norm_sp(set_: Callable) -> None:
    torch_norm = _mod("transformer.torch_norm")
    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        import dataclasses

        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), *args, **kwargs
        )
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    set_(torch_norm.WrappedTorchNorm, "__new__", staticmethod(__new__))


# --------------------------------------------------------------------------------------------
# moe_te_gemm
# --------------------------------------------------------------------------------------------
@_patch(
    "moe_te_gemm",
    assumes="the name `te_general_gemm` exists in moe_utils; it is only imported when "
    "TransformerEngine is, so every MoE router forward raises NameError without TE",
    where="transformer/moe/moe_utils.py: RouterGatingLinearFunction",
    why_safe="None selects the router's plain torch matmul path, the intended fallback "
    "(an upstream bug: GPU installs without TE hit it too, hence always applied)",
    always=True,
)
def _moe_te_gemm(set_: Callable) -> None:
    moe_utils = _mod("transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        set_(moe_utils, "te_general_gemm", None)


# --------------------------------------------------------------------------------------------
# moe_splits
# --------------------------------------------------------------------------------------------
@_patch(
    "moe_splits",
    assumes="maybe_move_tensor_to_cpu turns split sizes into numpy only for CUDA tensors; "
    "gloo's all_to_all_single then receives tensors as split sizes and rejects them",
    where="transformer/moe/token_dispatcher.py (MoEAlltoAllTokenDispatcher) via "
    "moe_utils.maybe_move_tensor_to_cpu",
    why_safe="the same conversion (tensor -> numpy) applied to tensors that are already on "
    "the CPU; values are unchanged",
)
def _moe_splits(set_: Callable) -> None:
    dispatcher = _mod("transformer.moe.token_dispatcher")

    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    set_(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


# --------------------------------------------------------------------------------------------
# uneven_collectives
# --------------------------------------------------------------------------------------------
def _padded_gather(input_: torch.Tensor, group: Any, sizes: list[int]) -> torch.Tensor:
    """all_gather along dim 0 with per-rank sizes, via one even gather of padded chunks."""
    width = max(sizes)
    padded = input_.new_zeros((width, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    out = input_.new_empty((width * len(sizes), *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[i * width : i * width + n] for i, n in enumerate(sizes)])


def _padded_reduce_scatter(input_: torch.Tensor, group: Any, sizes: list[int]) -> torch.Tensor:
    """reduce_scatter along dim 0 with per-rank sizes, via one even reduce_scatter."""
    width = max(sizes)
    padded = input_.new_zeros((width * len(sizes), *input_.shape[1:]))
    for i, chunk in enumerate(torch.split(input_, sizes, dim=0)):
        padded[i * width : i * width + chunk.shape[0]] = chunk
    out = input_.new_empty((width, *input_.shape[1:]))
    torch.distributed.reduce_scatter_tensor(out, padded, group=group)
    return out[: sizes[group.rank()]]


@_patch(
    "uneven_collectives",
    assumes="torch.distributed.all_gather / reduce_scatter accept per-rank tensors of "
    "different first-dim sizes (the MoE alltoall dispatcher with expert-tensor-parallel > 1)",
    where="tensor_parallel/mappings.py: _gather_along_first_dim, "
    "_reduce_scatter_along_first_dim (with output/input_split_sizes)",
    why_safe="zero padding to the largest chunk, an even collective, then slicing: the same "
    "values; padding adds zeros, which do not change a sum",
)
def _uneven_collectives(set_: Callable) -> None:
    mappings = _mod("tensor_parallel.mappings")
    gather, reduce_scatter = (
        mappings._gather_along_first_dim,
        mappings._reduce_scatter_along_first_dim,
    )

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return _padded_gather(input_, group, [int(s) for s in output_split_sizes])

    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if input_split_sizes is None or group is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        return _padded_reduce_scatter(input_, group, [int(s) for s in input_split_sizes])

    set_(mappings, "_gather_along_first_dim", _gather_along_first_dim)
    set_(mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim)


# --------------------------------------------------------------------------------------------
# type_names
# --------------------------------------------------------------------------------------------
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _CUDA_TYPE_NAMES.get(name, name)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


@_patch(
    "type_names",
    assumes="optimizer code checks tensor.type() against 'torch.cuda.FloatTensor' "
    "(and Half/BFloat16) and raises for anything else",
    where="optimizer/clip_grads.py: clip_grad_by_total_norm_fp32; optimizer/optimizer.py: "
    "Float16OptimizerWithFloat16Params.__init__; optimizer/distrib_optimizer.py: "
    "DistributedOptimizer.__init__ and _build_model_and_main_param_groups",
    why_safe="inside exactly those functions a CPU tensor reports the CUDA name of its dtype; "
    "the checks are about dtype, which is unchanged",
)
def _type_names(set_: Callable) -> None:
    clip_grads, optimizer = _mod("optimizer.clip_grads"), _mod("optimizer.optimizer")
    distrib = _mod("optimizer.distrib_optimizer")
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    set_(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    set_(optimizer, "clip_grad_by_total_norm_fp32", clip)
    f16 = optimizer.Float16OptimizerWithFloat16Params
    set_(f16, "__init__", _with_cuda_type_names(f16.__init__))
    dist_opt = distrib.DistributedOptimizer
    set_(dist_opt, "__init__", _with_cuda_type_names(dist_opt.__init__))
    build = dist_opt.__dict__["_build_model_and_main_param_groups"]
    set_(
        dist_opt,
        "_build_model_and_main_param_groups",
        classmethod(_with_cuda_type_names(build.__func__)),
    )


# --------------------------------------------------------------------------------------------
# batch_p2p
# --------------------------------------------------------------------------------------------
@_patch(
    "batch_p2p",
    assumes="batch_isend_irecv (config.batch_p2p_comm=True, the default) orders sends and "
    "receives between stage pairs correctly",
    where="pipeline_parallel/p2p_communication.py: _batched_p2p_ops (interleaved schedule)",
    why_safe="on gloo the batched path gives wrong gradients under the interleaved schedule "
    "(upstream Megatron-LM #750, #1450); the unbatched isend/irecv path moves the same "
    "tensors and is what batch_p2p_comm=False selects",
)
def _batch_p2p(set_: Callable) -> None:
    p2p = _mod("pipeline_parallel.p2p_communication")
    unbatched = p2p._p2p_ops

    def _batched_p2p_ops(**kwargs: Any) -> list:
        return list(unbatched(**kwargs).values())

    set_(p2p, "_batched_p2p_ops", _batched_p2p_ops)


# --------------------------------------------------------------------------------------------
# distopt_gather
# --------------------------------------------------------------------------------------------
@_patch(
    "distopt_gather",
    assumes="DistributedOptimizer.get_parameter_state_dp_zero moves its shards to CUDA "
    "(`.cuda()`) unless called with use_gloo_comm=True (the fully_reshardable checkpoint "
    "format calls it with False)",
    where="optimizer/distrib_optimizer.py: get_parameter_state_dp_zero",
    why_safe="use_gloo_comm=True gathers the same CPU tensors over the gloo data-parallel "
    "group megatron creates alongside the default one",
)
def _distopt_gather(set_: Callable) -> None:
    dist_opt = _mod("optimizer.distrib_optimizer").DistributedOptimizer
    gather = dist_opt.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self: Any, use_gloo_comm: bool = True, **kwargs: Any) -> Any:
        return gather(self, use_gloo_comm=True, **kwargs)

    set_(dist_opt, "get_parameter_state_dp_zero", get_parameter_state_dp_zero)


# --------------------------------------------------------------------------------------------
# distopt_ckpt
# --------------------------------------------------------------------------------------------
@_patch(
    "distopt_ckpt",
    assumes="DistributedOptimizer checkpointing with torch-native Adam (no apex/TE): "
    "(a) a fresh optimizer has Adam states, so state_dict() finds one `step`; "
    "(b) every Adam state is a tensor to copy from the checkpoint, but torch Adam's 0-dim "
    "`step` is not in it (KeyError), and the copy writes into a view of a leaf parameter "
    "outside no_grad; (c) load_state_dict gives every param the same `step` tensor",
    where="optimizer/distrib_optimizer.py: DistributedOptimizer.sharded_state_dict "
    "(is_loading=True), _set_main_param_and_optimizer_states, load_state_dict",
    why_safe="(a) states are initialised with dummy values (a zero-grad step) that loading then "
    "overwrites, as megatron does for other formats; (b) copy only the states the checkpoint "
    "has, under no_grad, keeping the step restored from the param groups; (c) each param gets "
    "its own copy of that step. Without (c) torch Adam increments the shared tensor once per "
    "param, so "
    "after a resume the bias correction uses step + n_params: an upstream bug that bites GPU "
    "runs without apex/TE too, hence always applied",
    always=True,
)
def _distopt_ckpt(set_: Callable) -> None:
    distrib = _mod("optimizer.distrib_optimizer")
    dist_opt = distrib.DistributedOptimizer
    sharded_state_dict, load_state_dict = dist_opt.sharded_state_dict, dist_opt.load_state_dict

    def sharded_state_dict_(
        self: Any,
        model_sharded_state_dict: Any = None,
        is_loading: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # (a) only torch-native Adam reads `step` from per-param states (apex/TE keep it in
        # the param groups).
        if is_loading and not distrib.HAVE_APEX_OR_TE and not any(self.optimizer.state.values()):
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    def load_state_dict_(self: Any, state_dict: Any) -> Any:
        out = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
        return out

    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                dst[key].copy_(value)

    set_states = dist_opt._set_main_param_and_optimizer_states
    set_(dist_opt, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states)
    set_(dist_opt, "sharded_state_dict", sharded_state_dict_)
    set_(dist_opt, "load_state_dict", load_state_dict_)


# --------------------------------------------------------------------------------------------
# distopt_empty
# --------------------------------------------------------------------------------------------
@_patch(
    "distopt_empty",
    assumes="DistributedOptimizer.state_dict with torch-native Adam (no apex/TE) takes `step` "
    "from the per-parameter Adam states and asserts there is exactly one value; an optimizer "
    "that holds no parameter on this rank has none. megatron-core gives every rank the same "
    "param groups (empty where a rank has no trainable parameter of the group), so this is "
    "every save and load of a partly frozen model in which some rank owns no trainable "
    "parameter of a group: e.g. NaViL's stage S1.1 at EP=2, where the rank holding the text "
    "expert (frozen) has an empty expert optimizer",
    where="optimizer/distrib_optimizer.py: DistributedOptimizer.state_dict, "
    "step_with_ready_grads, load_state_dict, sharded_state_dict",
    why_safe="the optimizer counts its inner steps (from the step it loaded) and reports "
    "that count when it has no per-parameter state, which is the `step` every parameter of a "
    "non-empty optimizer holds: all of a ChainedOptimizer's optimizers step or skip together, "
    "and rank 0, whose common state the checkpoint keeps, may be the empty one. The state "
    "dict is otherwise what the original builds; the empty optimizer's empty parameter "
    "state is left out of the checkpoint (nothing to save or load). An upstream bug that "
    "bites GPU runs without apex/TE too, hence always applied",
    always=True,
)
def _distopt_empty(set_: Callable) -> None:
    distrib = _mod("optimizer.distrib_optimizer")
    dist_opt = distrib.DistributedOptimizer
    state_dict, step_with_ready_grads = dist_opt.state_dict, dist_opt.step_with_ready_grads
    load_state_dict = dist_opt.load_state_dict
    counter = "_navil_inner_steps"

    def state_dict_(self: Any) -> Any:
        if distrib.HAVE_APEX_OR_TE or any(self.optimizer.state.values()):
            return state_dict(self)
        # the original's structure, with the counted step (no parameter holds one)
        inner = self.optimizer.state_dict()
        out: dict[str, Any] = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = float(getattr(self, counter, 0))
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def step_with_ready_grads_(self: Any) -> bool:
        done = step_with_ready_grads(self)
        if done and not self.is_stub_optimizer:
            setattr(self, counter, getattr(self, counter, 0) + 1)
        return done

    def load_state_dict_(self: Any, state: Any) -> Any:
        out = load_state_dict(self, state)
        steps = {g.get("step") for g in state.get("optimizer", {}).get("param_groups", [])}
        steps.discard(None)
        if len(steps) == 1:
            setattr(self, counter, int(steps.pop()))
        return out

    def sharded_state_dict_(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = sharded_state_dict(self, *args, **kwargs)
        if isinstance(out, dict) and out.get("param_state") == {}:
            # no parameter, no parameter state: an empty dict would be common state that only
            # this rank has (megatron-core warns at every save that rank 0's differs)
            del out["param_state"]
        return out

    sharded_state_dict = dist_opt.sharded_state_dict
    set_(dist_opt, "state_dict", state_dict_)
    set_(dist_opt, "step_with_ready_grads", step_with_ready_grads_)
    set_(dist_opt, "load_state_dict", load_state_dict_)
    set_(dist_opt, "sharded_state_dict", sharded_state_dict_)


# --------------------------------------------------------------------------------------------
# distopt_buckets
# --------------------------------------------------------------------------------------------
@_patch(
    "distopt_buckets",
    assumes="DistributedOptimizer.sharded_param_state_fully_reshardable slices each "
    "parameter's state out of get_parameter_state_dp_zero's world tensors at the parameter's "
    "buffer offsets (buffer.param_index_map), which count the padding at the end of every "
    "bucket, while the world tensors are built without that padding",
    where="optimizer/distrib_optimizer.py: DistributedOptimizer."
    "sharded_param_state_fully_reshardable",
    why_safe="the offsets are moved into the world tensors' coordinates (less the end "
    "padding of the buckets before the parameter's own) for the call, then restored; with "
    "one bucket per buffer nothing moves. An upstream bug that bites GPU runs too: with "
    "several buckets (overlap_grad_reduce with a model above bucket_size parameters) every "
    "parameter after the first bucket saves a shifted slice of the buffer as its optimizer "
    "state (master weight, Adam moments), and a resume silently trains from it",
    always=True,
)
def _distopt_buckets(set_: Callable) -> None:
    dist_opt = _mod("optimizer.distrib_optimizer").DistributedOptimizer
    original = dist_opt.sharded_param_state_fully_reshardable

    def sharded_param_state_fully_reshardable(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = []
        for buffer in self.buffers:
            shifts, unpadded = [], 0
            for bucket in buffer.buckets:
                shifts.append(bucket.offset - unpadded)
                unpadded += bucket.numel_unpadded
            saved.append(buffer.param_index_map)
            buffer.param_index_map = {
                param: (start - shifts[b], end - shifts[b], b)
                for param, (start, end, b) in buffer.param_index_map.items()
            }
        try:
            return original(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, saved, strict=True):
                buffer.param_index_map = index_map

    set_(dist_opt, "sharded_param_state_fully_reshardable", sharded_param_state_fully_reshardable)


# --------------------------------------------------------------------------------------------
# ckpt_fork_manager
# --------------------------------------------------------------------------------------------
@_patch(
    "ckpt_fork_manager",
    assumes="the torch_dist checkpoint writer may start a *spawn* multiprocessing Manager for "
    "its results queue; spawn re-imports `__main__`, so a training script without an "
    "`if __name__ == '__main__':` guard re-runs itself (and fails), and each save pays ~5 s "
    "of interpreter start-up",
    where="dist_checkpointing/strategies/filesystem_async.py: _get_write_results_queue",
    why_safe="a fork-context Manager serves the same queue; on CPU there is no CUDA context "
    "that forking could corrupt (the reason megatron picked spawn)",
)
def _ckpt_fork_manager(set_: Callable) -> None:
    import multiprocessing

    fs = _mod("dist_checkpointing.strategies.filesystem_async")

    def _get_write_results_queue() -> Any:
        if fs._results_queue is None:
            fs._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return fs._results_queue

    set_(fs, "_get_write_results_queue", _get_write_results_queue)


# --------------------------------------------------------------------------------------------
# applying
# --------------------------------------------------------------------------------------------
def _disabled_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def apply(disable: Iterable[str] = (), *, cuda: bool | None = None) -> list[str]:
    """Apply the shim: every patch when CUDA is unavailable, only the ``always`` ones with it.

    ``disable`` (and ``$MEGATRON_NAVIL_SHIM_DISABLE``) name patches to leave out; unknown names
    raise ValueError. Idempotent. Returns the names of the patches active afterwards.
    """
    import megatron.core

    found = getattr(megatron.core, "__version__", None)
    if found != MCORE_VERSION:
        raise RuntimeError(
            f"megatron_navil's CPU shim is written against megatron-core=={MCORE_VERSION}, "
            f"found {found}; install the pinned version (pip install "
            f"megatron-core=={MCORE_VERSION})"
        )
    disabled = set(disable) | _disabled_from_env()
    unknown = disabled - PATCHES.keys()
    if unknown:
        raise ValueError(f"unknown shim patch(es) {sorted(unknown)}; known: {sorted(PATCHES)}")
    if cuda is None:
        cuda = torch.cuda.is_available()
    for name, patch in PATCHES.items():
        if name in disabled or (cuda and not patch.always):
            patch.revert()
        else:
            patch.apply()
    return active()


def active() -> list[str]:
    """Names of the patches currently applied."""
    return [name for name, patch in PATCHES.items() if patch.active]


def revert_all() -> None:
    """Undo every patch (tests use this to show a patch is needed)."""
    for patch in reversed(list(PATCHES.values())):
        patch.revert()


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    """Run a block with the named patches reverted, then re-apply them."""
    patches = [PATCHES[n] for n in names]
    was_active = [p.active for p in patches]
    for p in patches:
        p.revert()
    try:
        yield
    finally:
        for p, was in zip(patches, was_active, strict=True):
            if was:
                p.apply()
