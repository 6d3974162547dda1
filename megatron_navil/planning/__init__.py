"""The layout planner: memory, FLOPs and step time of a NaViL model in a parallel layout, from
the sizes alone (no torch model is built; importable without torch.distributed), and the
search for the layouts that fit a cluster. ``tools/plan_layout.py`` is its CLI; ``launch.py``
prints its numbers before a run.

Modules, in the order they build on each other:

* ``layout``: :class:`~megatron_navil.planning.layout.Layout` (TP/PP/VPP/EP/DP, recompute,
  dtype, stage, what a micro-batch holds) and its validation; the stages' trained groups;
* ``params``: parameters per rank by recipe group (over ``config.params.part_params``);
* ``activations``: bytes kept per LLM layer / vision block / stage, and transient peaks;
* ``schedule``: micro-batches in flight under (interleaved) 1F1B;
* ``memory``: weights + grads + optimizer + activations per pipeline rank;
* ``flops``: model FLOPs per sequence and step (also what MFU counts);
* ``hardware``: GPU presets (H100, H200, A100, B200) and the step-time calibration constants,
  each with its source; a measured CPU preset;
* ``perf``: the step-time model of a transformer in a layout (per-part terms, ``Breakdown``);
* ``published``: the published Megatron-Bridge runs it is validated on;
* ``straggler``: the slowest data-parallel replica's extra time from the image sizes;
* ``predict``: the step-time model applied to a NaViL layout;
* ``search``: every valid layout for a GPU count, ranked by the predicted step time.

Imports ``config/`` and (lazily, for the stage layer split) ``models.build``, nothing else.
"""
