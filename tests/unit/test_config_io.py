"""config/io.py and checkpoint/config.py: configs written into checkpoints and ``--config
NAME|PATH`` resolution, and the train entry's choice between an explicit --config and the one
a checkpoint carries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_navil.checkpoint.config import checkpoint_config_file, resolve_config
from megatron_navil.config import get_config
from megatron_navil.config.io import CONFIG_FILE, config_from_dict, config_to_dict, write_config


def _odd():
    """A config no registry name describes (as an imported HF LLM of other dimensions)."""
    base = get_config("tiny")
    return dataclasses.replace(
        base, name="imported", language=dataclasses.replace(base.language, layers=6, ffn=96)
    ).validate()


def _checkpoint(root: Path, iteration: int, cfg=None, complete: bool = True) -> Path:
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    if complete:
        (d / "train_state.json").write_text("{}")
    if cfg is not None:
        write_config(d, cfg)
    return d


def test_round_trip_of_every_registered_config():
    for name in ("tiny", "navil-2b", "navil-9b"):
        cfg = get_config(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_names_files_and_checkpoints(tmp_path):
    assert resolve_config("tiny") == get_config("tiny")
    odd = _odd()
    assert resolve_config(write_config(tmp_path, odd)) == odd
    save = tmp_path / "save"
    _checkpoint(save, 2, get_config("tiny"))
    newest = _checkpoint(save, 4, odd)
    _checkpoint(save, 6, get_config("tiny"), complete=False)  # a crashed save: ignored
    (save / "iter_0000008.tmp").mkdir()
    assert checkpoint_config_file(save) == newest / CONFIG_FILE
    assert resolve_config(save) == odd  # the save directory: its newest complete checkpoint
    assert resolve_config(newest) == odd  # one iter_* directory
    assert checkpoint_config_file(tmp_path / "nothing") is None


def test_bad_specs_are_one_line_errors(tmp_path):
    known = r"unknown config 'navil-3b': not a registered name \(tiny, navil-2b, navil-9b\)"
    with pytest.raises(ValueError, match=known):
        resolve_config("navil-3b")
    _checkpoint(tmp_path / "old", 1)  # saved before checkpoints carried their config
    with pytest.raises(ValueError, match=r"carries no navil_config\.json"):
        resolve_config(tmp_path / "old")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="is not a valid model config"):
        resolve_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid model config"):
        resolve_config(bad)


def test_train_takes_the_checkpoints_config_unless_told(tmp_path):
    from megatron_navil.train import _model_config

    odd, tiny = _odd(), get_config("tiny")
    _checkpoint(tmp_path / "init", 0, odd)
    _checkpoint(tmp_path / "load", 3, tiny)

    def args(config=None, load=None, init=None):
        return (config, load, init)

    assert _model_config(*args()) == tiny
    assert _model_config(*args(init=str(tmp_path / "init"))) == odd
    # --load (the run's own save directory) wins over --init (its starting point)
    assert _model_config(*args(load=str(tmp_path / "load"), init=str(tmp_path / "init"))) == tiny
    assert _model_config(*args(load=str(tmp_path / "empty"), init=str(tmp_path / "init"))) == odd
    assert _model_config(*args(config="tiny", load=str(tmp_path / "load"))) == tiny
    with pytest.raises(ValueError, match=r"differs from the --init checkpoint's model.*layers"):
        _model_config(*args(config="tiny", init=str(tmp_path / "init")))


def test_configs_written_before_the_token_order_read_as_raster(tmp_path):
    """A navil_config.json from before ``window_size`` existed was trained in raster order:
    it loads as ``window_size=None``; its never-used window attention is refused."""
    data = config_to_dict(get_config("tiny"))
    vision = data["vision"]
    del vision["window_size"], vision["fullatt_block_indexes"]
    vision.update(window=None, full_attention_layers=[])
    old = config_from_dict(json.loads(json.dumps(data)))
    assert old.vision.window_size is None and old.vision.fullatt_block_indexes is None
    assert old.replace(vision=get_config("tiny").vision) == get_config("tiny")
    vision.update(window=2, full_attention_layers=[1])
    with pytest.raises(ValueError, match="the window attention that restored raster order"):
        config_from_dict(data)
    new = config_to_dict(
        get_config("navil-9b").replace(
            vision=dataclasses.replace(get_config("navil-9b").vision, fullatt_block_indexes=(3, 7))
        )
    )
    back = config_from_dict(json.loads(json.dumps(new)))
    assert back.vision.fullatt_block_indexes == (3, 7) and back.vision.window_size == 8
