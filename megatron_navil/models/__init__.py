"""NaViL's modules: vision encoder, connector, modality-expert LLM layers, the whole model.

Never imports ``data/``, ``training/`` or ``tools/`` (see DESIGN.md): the model takes tensors.
"""
