"""Results leaving the tool.

- `hf`: a trained run's newest checkpoint as a Hugging Face model (dense as Llama, MoE as Mixtral), checked by
  logits against the megatron-core model it came from.
"""
