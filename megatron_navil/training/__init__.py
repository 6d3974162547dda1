"""Training: stage recipes and freezing, the loop (saving and resuming through ``checkpoint/``),
the step, held-out evaluation, logging.

May import everything below it (config, ops, models, data, parallel, checkpoint); nothing
imports it but tools/, examples/ and the entry point.
"""
