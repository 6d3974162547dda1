"""Initial weights that depend on the seed and the parameter's name only, not on the layout.

megatron-core draws every rank's weights from one generator in construction order: with TP the
full matrix is drawn and split (``use_cpu_initialization``), but a pipeline stage builds only
its own layers and an expert-parallel rank only its own experts, so the same seed gives other
weights at PP2, VPP2, EP2 or another first-stage split than in one process. Runs at different
layouts then differ from step 1 and cannot be compared.

:func:`init_by_name` redraws every matrix after construction: for each parameter's checkpoint
key (``sharded_state_dict``: the same global name, shape and slice in every layout; experts are
one tensor with a leading expert axis) the whole tensor is drawn with the default generator
seeded from ``sha256(seed, key)`` by the model's own init function for that kind of matrix
(megatron's ``init_method`` / ``output_layer_init_method``, the vision tower's scaled one), and
this rank keeps its slice. One-dimensional parameters (norm weights, biases, layer scales) are
constants set by their constructors, the same in every layout, and are left as they are.
Cost: each rank draws the whole tensor of every matrix it holds a part of, as megatron-core's
CPU initialisation already does for TP.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_navil.config.model import NaViLConfig

# Output projections (they add into the residual stream): megatron's scaled initialisation,
# std / sqrt(2 * depth) with the LLM's or the vision tower's depth.
_LLM_OUTPUT = re.compile(
    r"^layers\.\d+\.(self_attention\.linear_proj\.|mlp\.experts\..*linear_fc2)"
)
_VISION_OUTPUT = re.compile(r"^vision_model\.encoder\.layers\.\d+\.(attn\.proj|mlp\.fc2)\.weight$")


def sharded_parameters(chunks: list[torch.nn.Module]) -> Iterator[Any]:
    """Every ``ShardedTensor`` of the model chunks' ``sharded_state_dict`` (factories built),
    its ``data`` a view of this rank's part of a parameter; ``_extra_state`` entries left out."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        sharded, _ = extract_sharded_base(module.sharded_state_dict())
        stack = list(sharded.values())
        while stack:
            item = stack.pop()
            if isinstance(item, ShardedTensorFactory):
                built = item.build()
                stack.extend(built.values() if isinstance(built, dict) else [built])
            elif isinstance(item, ShardedTensor) and not item.key.endswith("_extra_state"):
                yield item
            elif isinstance(item, list | tuple):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())


def init_method_for(key: str, cfg: NaViLConfig, mcore_config: Any) -> Callable[[Any], Any]:
    """The model's init function of the matrix named ``key`` (module doc)."""
    from megatron.core.utils import scaled_init_method_normal

    if _LLM_OUTPUT.match(key):
        return mcore_config.output_layer_init_method
    if _VISION_OUTPUT.match(key):
        return scaled_init_method_normal(mcore_config.init_method_std, cfg.vision.depth)
    return mcore_config.init_method


def key_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from ``(seed, key)``."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_by_name(
    chunks: list[torch.nn.Module], cfg: NaViLConfig, mcore_config: Any, seed: int
) -> int:
    """Redraw every matrix of this rank's ``chunks`` as a function of ``(seed, its key)``
    (module doc); returns the number of tensors drawn. Call before the chunks are wrapped
    (DDP, Float16Module); the default generator's state is restored after."""
    keys: set[str] = set()
    last: tuple[str, torch.Tensor] | None = None  # a factory's pieces come one after another
    with torch.random.fork_rng(devices=[]):
        for sh in sharded_parameters(chunks):
            if len(sh.global_shape) < 2:
                continue  # constants from the constructors (norms, biases, layer scales)
            if last is None or last[0] != sh.key:
                torch.manual_seed(key_seed(seed, sh.key))
                full = torch.empty(tuple(sh.global_shape), dtype=torch.float32)
                init_method_for(sh.key, cfg, mcore_config)(full)
                last = (sh.key, full)
                keys.add(sh.key)
            sh.data.copy_(last[1][sh.global_slice()].reshape(sh.data.shape))
    return len(keys)
