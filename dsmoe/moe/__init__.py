"""Adapters built from DeepSpeed MoE layers: experts, routers and the adapter branch."""
