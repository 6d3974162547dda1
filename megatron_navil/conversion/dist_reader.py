"""Read a megatron-core dist checkpoint (torch_dist backend) one global tensor at a time, in
one process, without a process group.

The torch_dist backend is PyTorch Distributed Checkpoint (DCP): ``.metadata`` lists every
tensor's global shape and the chunks (offset, size) each rank wrote. Loading a state dict
of just ``{key: empty global tensor}`` with ``no_dist=True`` makes DCP read exactly that
tensor's chunks from whatever files hold them and assemble it, whatever TP/PP/EP layout wrote
it. So memory is one tensor at a time, never the whole model.

What a checkpoint holds besides model tensors, and is skipped: ``optimizer.*`` and
``chained_N.optimizer.*`` (optimizer state; megatron-core chains one optimizer per expert and
dense parameter set when EP > 1), ``*._extra_state`` byte objects (TransformerEngine/FP8
metadata, empty on the local path). Anything else that is not a tensor is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_navil.conversion.mapping import ConversionError

_EXTRA_STATE = re.compile(r"\._extra_state(/shard_[\d_.]+)?$")
_OPTIMIZER = re.compile(r"^(chained_\d+\.)?optimizer\.")


def _is_skipped(key: str) -> bool:
    return bool(_OPTIMIZER.match(key)) or bool(_EXTRA_STATE.search(key))


class DistCheckpointReader:
    """The model tensors of one ``iter_NNNNNNN`` directory (``path``)."""

    def __init__(self, path: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        if not meta_file.is_file():
            raise ConversionError(f"{self.path}: not a megatron dist checkpoint (no metadata.json)")
        if '"torch_dist"' not in meta_file.read_text():
            raise ConversionError(f"{self.path}: only the torch_dist backend is supported")
        try:
            metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as exc:
            raise ConversionError(f"{self.path}: unreadable checkpoint metadata ({exc})") from None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for key, item in metadata.state_dict_metadata.items():
            if _is_skipped(key):
                continue
            if not isinstance(item, TensorStorageMetadata):
                raise ConversionError(
                    f"{self.path}: entry {key!r} is a {type(item).__name__}, not a tensor; "
                    "the converter does not know it"
                )
            self.shapes[key] = tuple(item.size)
            self.dtypes[key] = item.properties.dtype

    def read(self, key: str) -> torch.Tensor:
        """The full global tensor ``key`` in its stored dtype."""
        from torch.distributed.checkpoint import FileSystemReader, load

        if key not in self.shapes:
            raise ConversionError(f"{self.path}: no tensor {key!r}")
        out = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        load({key: out}, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        return out
