"""Parameter counts of the built modules, on the meta device (nothing is allocated).

Checked against the analytic counts of ``megatron_navil.config.params.param_counts``.
"""

from __future__ import annotations

import torch

from megatron_navil.config.model import NaViLConfig
from megatron_navil.models.connector import Connector
from megatron_navil.models.tp import count_parameters, standalone_linear_config
from megatron_navil.models.vision import VisionEncoder


class _OneRank:
    """Stands in for a process group of one rank while building on the meta device (only
    ``size()`` and ``rank()`` are read), so counting never touches torch.distributed."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def meta_param_counts(cfg: NaViLConfig) -> dict[str, int]:
    """``{"vision": ..., "connector": ...}`` of the unsplit modules built on the meta device."""
    mcore_config = standalone_linear_config(perform_initialization=False)
    with torch.device("meta"):
        vision = VisionEncoder(cfg.vision, mcore_config, _OneRank())
        connector = Connector(
            cfg.vision.width,
            cfg.language.hidden,
            mcore_config,
            _OneRank(),
            merge=cfg.connector.merge,
            norm_eps=cfg.connector.norm_eps,
        )
    for module in (vision, connector):
        devices = {p.device.type for p in module.parameters()}
        if devices != {"meta"}:
            raise RuntimeError(f"{type(module).__name__} allocated parameters on {devices}")
    return {"vision": count_parameters(vision), "connector": count_parameters(connector)}
