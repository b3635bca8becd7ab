"""Throughput benchmark: the megatron-core training path against the same model in plain PyTorch.

- `baseline`: the plain-PyTorch model (`PlainGPT`) and its training step.
- `measure`: `megatron-moe bench`, fresh-process measurements, tokens/s, TFLOP/s, MFU and the tables.
"""
