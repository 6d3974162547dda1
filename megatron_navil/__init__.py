"""megatron_navil: a Megatron-style trainer for NaViL, a native vision-language model.

The package wraps megatron-core's tensor, pipeline, expert and data parallelism around a
vision encoder, a connector and an LLM with modality-specific experts, and adds C++/CUDA ops for
variable-resolution image packing, an offline corpus indexer and Hugging Face checkpoint
conversion. Importing it is cheap: submodules (and torch) are imported only where used.
"""

__version__ = "0.1.0"

# The megatron-core release the CPU shim in ``parallel/`` is written against. setup.py reads
# this line by regex and pins ``megatron-core==MCORE_VERSION``: keep it the single source.
MCORE_VERSION = "0.16.1"

__all__ = ["MCORE_VERSION", "__version__"]
