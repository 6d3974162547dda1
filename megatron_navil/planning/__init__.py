"""The layout planner: memory and FLOPs of a NaViL model in a parallel layout, from the sizes
alone (no torch model is built; importable without torch.distributed), and the search for the
layouts that fit a cluster. ``tools/plan_layout.py`` is its CLI; ``launch.py`` prints its
numbers before a run.

Modules, in the order they build on each other:

* ``layout``: :class:`~megatron_navil.planning.layout.Layout` (TP/PP/VPP/EP/DP, recompute,
  dtype, stage, what a micro-batch holds) and its validation; the stages' trained groups;
* ``params``: parameters per rank by recipe group (over ``config.params.part_params``);
* ``activations``: bytes kept per LLM layer / vision block / stage, and transient peaks;
* ``schedule``: micro-batches in flight under (interleaved) 1F1B;
* ``memory``: weights + grads + optimizer + activations per pipeline rank;
* ``flops``: model FLOPs per sequence and step (also what MFU counts);
* ``search``: every valid layout for a GPU count, ranked by a coarse step-time model.

Imports ``config/`` and (lazily, for the stage layer split) ``models.build``, nothing else.
"""
