"""DASD (cross-lingual cross-modal retrieval): dynamic adapters with semantics disentangling on CLIP's text encoder
(``model.py``), trained in stages (``method.py``); its YAML section is ``DASDConfig`` (``dasd:``)."""
from dsmoe.methods.registry import register
from dsmoe.methods.dasd.config import DASDConfig

register("dasd", DASDConfig, "dsmoe.methods.dasd.method:build_method")
