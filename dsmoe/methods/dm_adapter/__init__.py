"""DM-Adapter (text-based person retrieval): a sparse mixture of adapters with a domain-aware router in every block
of both CLIP encoders (``method.py``); its YAML section is ``DMAdapterConfig`` (``dm_adapter:``)."""
from dsmoe.methods.registry import register
from dsmoe.methods.dm_adapter.config import DMAdapterConfig

register("dm_adapter", DMAdapterConfig, "dsmoe.methods.dm_adapter.method:DMAdapterMethod")
