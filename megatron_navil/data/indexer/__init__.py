"""The corpus indexer behind ``tools/index_corpus.py``: plan, index work units, finalize.

The indexer turns multimodal corpora into the memory-mapped shards of ``data/shards`` in three
steps, each its own module, so every machine of a cluster job can run its share of the middle
one (``--shard-index/--num-shards``) and one machine the last:

* plan (:mod:`.plan`): the inputs (:mod:`.inputs`) and their records (:mod:`.records`) cut
  into work units, with the :mod:`.settings` that determine the output bytes, written as
  ``plan.json``;
* units (:mod:`.units`): each unit's records built into samples (:mod:`.samples`: template,
  tokens, loss mask, images and their scales) and written as shard parts, then a marker;
* finalize (:mod:`.manifest`): every unit checked done, ``manifest.json`` written; the
  tokenizer copied beside it.

Outputs depend only on the inputs and the settings in ``plan.json``, never on the worker count
or timing: a killed run resumes without duplicates and ends byte-identical to an uninterrupted
one.
"""
