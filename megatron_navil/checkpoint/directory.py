"""A save directory's layout, and the one definition of a complete checkpoint.

Layout of a save directory::

    <dir>/iter_0000100/            one complete checkpoint (torch_dist shards + metadata)
          train_state.json         iteration, LR scheduler, data sampler state, anything else
          navil_config.json        the model config (when the saver passes it)
          rng/rank_00003.pt        each rank's torch / numpy / python RNG states
    <dir>/iter_0000200.tmp/        a save in progress (or one that crashed): never loaded
    <dir>/latest_checkpointed_iteration.txt   Megatron-LM's marker, written last

A checkpoint is *complete* when its directory is named ``iter_NNNNNNN`` (7 digits or more) and
holds ``train_state.json``, which a save writes last before renaming ``iter_N.tmp`` to
``iter_N`` (``store.save``). Training resumes from, ``--init`` starts from, tools name and
``config.io`` reads the config of the newest complete checkpoint, all through this module.

Standard library only: ``config.io`` imports it (configs are found inside checkpoints).
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_navil.checkpoint.errors import CheckpointError

TRAIN_STATE = "train_state.json"
"""What a complete checkpoint holds besides the shards: its iteration and training state."""
MARKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's marker of the newest iteration, written last by a save."""
ITERATION_NAME = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(directory: str | Path, iteration: int) -> Path:
    """``directory/iter_NNNNNNN``: where the checkpoint of ``iteration`` goes."""
    return Path(directory) / f"iter_{iteration:07d}"


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint (module doc)."""
    p = Path(path)
    return ITERATION_NAME.match(p.name) is not None and (p / TRAIN_STATE).is_file()


def complete_iterations(directory: str | Path) -> list[int]:
    """Iterations of the complete checkpoints in the save directory ``directory``, ascending
    (none when it does not exist)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [ITERATION_NAME.match(p.name) for p in root.iterdir() if is_complete(p)]
    return sorted(int(m.group(1)) for m in found if m)


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint of the save directory ``directory``, or None."""
    iterations = complete_iterations(directory)
    return iteration_dir(directory, iterations[-1]) if iterations else None


def require_complete(path: str | Path) -> Path:
    """``path`` as a Path when it is a complete checkpoint, else CheckpointError: what
    loading checks before megatron-core reads anything."""
    p = Path(path)
    if not is_complete(p):
        raise CheckpointError(f"{p} is not a complete checkpoint (iter_NNNNNNN with train_state)")
    return p


def resolve_checkpoint(path: str | Path) -> Path:
    """What a user names a checkpoint by, as its directory: ``path`` itself when it is a
    complete ``iter_NNNNNNN`` checkpoint, else the newest complete one in the save directory
    ``path``. CheckpointError saying which was not found."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if ITERATION_NAME.match(p.name):
        if not is_complete(p):
            raise CheckpointError(f"{p}: not a complete checkpoint (no {TRAIN_STATE})")
        return p
    found = latest(p)
    if found is None:
        raise CheckpointError(f"{p}: no complete checkpoint (iter_NNNNNNN/ with {TRAIN_STATE})")
    return found
