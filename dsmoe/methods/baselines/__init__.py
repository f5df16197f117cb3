"""Baselines trained by the same loop, data, evaluation, checkpoints and export as the methods: LoRA on CLIP's
attention projections through Hugging Face peft (``lora``) and CLIP fine-tuned whole (``full``), both with the SDM
loss on person-retrieval pairs: the rows that the person-retrieval papers set next to their parameter-efficient
methods. Their YAML sections: ``LoRAConfig`` (``lora:``) and ``FullConfig`` (``full:``)."""
from dsmoe.methods.baselines.config import FullConfig, LoRAConfig
from dsmoe.methods.registry import register

register("lora", LoRAConfig, "dsmoe.methods.baselines.method:LoRAMethod")
register("full", FullConfig, "dsmoe.methods.baselines.method:FullMethod")
