"""Checkpoints, in one place: what a save directory holds and which of its checkpoints are
complete (``directory``, standard library only, so ``config.io`` can find the config a
checkpoint carries), saving and loading through megatron-core dist-checkpointing (``store``),
and a model loaded for inference with the special ids it needs (``model``); their errors
(``errors``).

Imports only ``config/`` and, in ``model``, ``models/``; training, conversion, the tools and
the entry point import it. Nothing is imported here, so that importing
``checkpoint.directory`` stays free of torch.
"""
