"""Helpers for multi-process tests and demos: a spawn runner for gloo process groups
(:mod:`.multiproc`) and a tiny megatron-core GPT that holds the same weights in every parallel
layout (:mod:`.tiny_gpt`). Part of the package so tests, examples and later tools share them."""
