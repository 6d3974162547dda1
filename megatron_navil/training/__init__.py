"""Training: stage recipes and freezing, the loop, checkpoints, logging.

May import everything below it (config, ops, models, data, parallel); nothing imports it but
tools/, examples/ and the entry point.
"""
