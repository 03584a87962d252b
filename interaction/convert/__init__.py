"""Checkpoint conversion: train -> serve, open MoE LLMs (Hugging Face layout) <-> interaction.

``launch/convert.py`` is the command line; the modules here hold the logic:
``params`` (names, shapes and axes of a model's parameters; the text-only
forward), ``safetensors_io`` (a strict, pickle-free safetensors reader and
streaming writer), ``train_to_serve`` (array-by-array from an orbax trainer
checkpoint) and ``hf`` (the Mixtral / Qwen3-MoE mapping).
"""
