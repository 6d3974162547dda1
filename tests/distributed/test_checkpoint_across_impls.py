"""A dist checkpoint loads across transformer implementations (checkpoint/store.py).

TransformerEngine modules carry an ``_extra_state`` (FP8 metadata) where megatron-core's torch
modules have none; the weights have the same keys (models/impl.py). TE cannot be built on a
CPU, so the TE side is a stand-in: the tiny model with its LLM norms given an
``_extra_state`` (a subclass of their class, exactly what makes a TE norm's checkpoint entry
differ). Checked: a checkpoint of the plain model loads into the stand-in (weights equal,
the stand-in keeps its own extra state), the stand-in's checkpoint loads into the plain model,
and a checkpoint that lacks a real weight still fails to load.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed


def _with_extra_state(model: torch.nn.Module, add_weight: bool = False) -> None:
    """Give every LLM norm an ``_extra_state`` (and, with ``add_weight``, a parameter the
    plain model does not have)."""
    for name, module in list(model.named_modules()):
        if not name.endswith(("input_layernorm", "post_attention_layernorm", "final_layernorm")):
            continue
        base = type(module)

        class WithExtra(base):  # type: ignore[misc, valid-type]
            def get_extra_state(self):
                return {"fp8_meta": getattr(self, "meta", 7)}

            def set_extra_state(self, state):
                self.loaded_extra = state

        module.__class__ = WithExtra
        if add_weight:
            module.register_parameter("scale2", torch.nn.Parameter(torch.ones(1)))


def _cases() -> dict:
    from megatron_navil.checkpoint.store import (
        _drop_unsaved_extra_state,
        load,
        load_weights,
        save,
        sharded_state,
    )
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    cfg = get_config("tiny")
    ids = N.special_ids_for(cfg)

    def model(seed: int):
        (m,) = build_model(cfg, transformer_config(cfg), groups, special_ids=ids, init_seed=seed)
        return m

    def same(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("_extra_state"))

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain = model(1)
        plain_ckpt = save(Path(tmp) / "plain", 1, [plain], None, {})
        te_like = model(2)
        _with_extra_state(te_like)
        out["differ_before"] = not same(plain, te_like)
        # what the load leaves out: nothing for the same implementation, else the norms' state
        out["dropped_same"] = _drop_unsaved_extra_state(
            sharded_state([plain], None, True), plain_ckpt
        )
        out["dropped_te"] = _drop_unsaved_extra_state(
            sharded_state([te_like], None, True), plain_ckpt
        )
        load_weights(plain_ckpt, [te_like])
        out["plain_into_te"] = same(plain, te_like)
        out["kept_extra"] = not hasattr(te_like.layers, "loaded_extra")
        te_like2 = model(3)
        _with_extra_state(te_like2)
        load(plain_ckpt, [te_like2], None)  # the resume path
        out["plain_into_te_resume"] = same(plain, te_like2)

        te_ckpt = save(Path(tmp) / "te", 1, [te_like], None, {})
        back = model(4)
        load_weights(te_ckpt, [back])
        out["te_into_plain"] = same(te_like, back)

        extra_weight = model(5)
        _with_extra_state(extra_weight, add_weight=True)
        try:
            load_weights(plain_ckpt, [extra_weight])
            out["missing_weight_error"] = None
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            out["missing_weight_error"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.mark.slow
def test_checkpoints_load_across_implementations():
    res = run_distributed(_cases, 1)[0]
    assert res["differ_before"]
    assert res["dropped_same"] == {}
    dropped = res["dropped_te"]["model"]
    assert dropped and all(k.endswith("layernorm._extra_state") for k in dropped), dropped
    assert res["plain_into_te"] and res["plain_into_te_resume"] and res["kept_extra"]
    assert res["te_into_plain"]
    assert res["missing_weight_error"] is not None and "scale2" in res["missing_weight_error"]
