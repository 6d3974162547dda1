"""Checkpoints, in one place: what a save directory holds and which of its checkpoints are
complete (``directory``, standard library only), what a user's ``--config`` names (``config``:
a registered name, a ``navil_config.json`` or a checkpoint carrying one; no torch either),
saving and loading through megatron-core dist-checkpointing (``store``; in the background:
``async_save``), and a model loaded for
inference with the special ids it needs (``model``); their errors (``errors``).

Imports only ``config/`` and, in ``store`` and ``model``, ``models/`` and ``parallel/``;
training, inference, conversion, the tools and the entry point import it. Nothing is imported
here, so that importing ``checkpoint.directory`` and ``checkpoint.config`` stays free of torch.
"""
