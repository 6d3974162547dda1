"""Indexed corpora: the on-disk shard format, its writer and memory-mapped reader, and the
corpus-level dataset over a manifest.

An indexed corpus is a directory written by ``tools/index_corpus.py``::

    OUT/manifest.json         the global manifest (written last, by ``finalize``)
    OUT/plan.json             the work plan (inputs, units, settings); the same on every machine
    OUT/tokenizer.json|.model a copy of the tokenizer the tokens were made with
    OUT/shards/NNNNNN-PPP.bin data: per sample its token ids, then its encoded images
    OUT/shards/NNNNNN-PPP.idx index: header + fixed-width records (numpy-memmappable)
    OUT/units/NNNNNN.json     per work unit: its shards, counts, skips (the resume marker)

Shard ``NNNNNN-PPP`` is part ``PPP`` of work unit ``NNNNNN`` (a contiguous range of input
records of one dataset); a unit rolls over to a new part when the ``.bin`` would grow past
``--shard-size-mb`` (a single sample larger than that gets a part of its own). The global sample
order is the manifest's shard order, samples in file order inside a shard.

Modules: ``format`` (the ``.bin``/``.idx`` byte layout), ``samples`` (a sample and its images
as the writer takes them and the reader gives them back, image-block expansion), ``writer``
(one shard), ``reader`` (one shard, memory-mapped and validated) and ``corpus`` (the manifest
and :class:`~megatron_navil.data.shards.corpus.ShardDataset`, every shard as one sequence).
"""
