"""Inference: captioning a checkpoint's model on indexed samples or image files.

``inputs``: what the model is given (prompts cut from samples as the training loader builds
them, or built for image files), packed several per forward; ``generate``: greedy generation
and a whole corpus's results. The model comes from ``checkpoint.model.load_model``.

May import config, ops and data; nothing imports it but tools/, the test helpers and tests.
"""
