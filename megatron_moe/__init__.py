"""megatron-moe: fair dense-versus-Mixture-of-Experts pretraining studies on Megatron-Core."""

__version__ = "0.1.0"
