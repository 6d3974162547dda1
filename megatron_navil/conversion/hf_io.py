"""Sharded safetensors in the HF layout: writing them as tensors stream in, reading them one
tensor at a time.

Writing: ``model-XXXXX-of-YYYYY.safetensors`` files of at most ``max_shard_bytes`` each (a
tensor larger than that gets a shard of its own) and ``model.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``), as ``transformers``' ``save_pretrained`` writes
them. Only the current shard is held in memory; the total number of shards is known at the
end, so shards are written under temporary names and renamed in :meth:`ShardedWriter.close`.
A single shard is named ``model.safetensors`` (no index), as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_navil.conversion.mapping import ConversionError


class ShardedWriter:
    """``add(name, tensor)`` in any order, then ``close()``."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max = int(max_shard_bytes)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.shards):
            raise ConversionError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        # a copy that owns its memory: safetensors refuses views and shared storage
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, name them all, write the index; returns the shard files."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        final = []
        weight_map = {}
        for i, (tmp, names) in enumerate(self.shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.dir / name)
            final.append(self.dir / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )
        return final


class SafetensorsDir:
    """The tensors of an HF directory (sharded with an index, or one ``model.safetensors``),
    read lazily one at a time."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConversionError(f"{self.dir}: no model.safetensors(.index.json)")
        self.weight_map: dict[str, str] = weight_map
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(weight_map.values())):
            path = self.dir / file
            if not path.is_file():
                raise ConversionError(f"{self.dir}: shard {file} named by the index is missing")
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())
        missing = sorted(set(weight_map) - set(self.shapes))
        if missing:
            raise ConversionError(
                f"{self.dir}: tensor {missing[0]!r} is in the index but in no shard"
            )

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: no tensor {name!r}")
        with safe_open(str(self.dir / self.weight_map[name]), "pt") as f:
            return f.get_tensor(name)
