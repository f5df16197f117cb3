"""OpenAI's CLIP weights, as the releases load them, turned into a transformers ``CLIPModel`` in memory.

The files the field holds: OpenAI's TorchScript archives (``ViT-B-16.pt``, which both releases and IRRA download),
the same weights as a plain state dict, and open_clip checkpoints of OpenAI's models (a state dict, possibly under
``"state_dict"`` with ``module.`` prefixes, in ``.pt``, ``.bin`` or ``.safetensors``). All share OpenAI's layout
(``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``text_projection``, ...); the model's
sizes are read from the tensors' shapes, its activation is OpenAI's QuickGELU. A TorchScript archive is read with
``torch.jit.load`` (as the releases read it), every other file without unpickling code (``weights_only``).
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

# OpenAI's CLIP tokenizer: start and end of text (the releases pad with 0)
BOS_ID, EOS_ID = 49406, 49407
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI or open_clip CLIP file, in fp32, under OpenAI's names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif _is_torchscript(path):
        with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files are TorchScript archives
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    state = {re.sub(r"^module\.", "", k): v.float() for k, v in state.items()}
    if "visual.conv1.weight" not in state or "text_projection" not in state:
        raise ValueError(f"{path} is not an OpenAI-layout CLIP ViT (no visual.conv1.weight / text_projection): "
                         f"give a transformers folder or hub id instead")
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _layers(state: dict, prefix: str) -> int:
    return len({int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}resblocks\.(\d+)\.", k))})


def openai_config(state: dict[str, torch.Tensor]) -> CLIPConfig:
    """The ``CLIPConfig`` of an OpenAI-layout state dict, from its tensors' shapes."""
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    context, vocab = state["positional_embedding"].shape[0], state["token_embedding.weight"].shape[0]
    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=_layers(state, "transformer."), num_attention_heads=text_width // 64,
                         max_position_embeddings=context, hidden_act="quick_gelu", bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, hidden_act="quick_gelu",
                           num_hidden_layers=_layers(state, "visual.transformer."),
                           num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch),
        projection_dim=state["text_projection"].shape[1])


def _blocks(state: dict, source: str, target: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        old, new = f"{source}resblocks.{i}.", f"{target}encoder.layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = state[f"{old}attn.in_proj_{name}"].chunk(3)
            out.update({f"{new}self_attn.q_proj.{name}": q, f"{new}self_attn.k_proj.{name}": k,
                        f"{new}self_attn.v_proj.{name}": v})
            out.update({f"{new}{ours}.{name}": state[f"{old}{theirs}.{name}"] for theirs, ours in _BLOCK.items()})
    return out


def clip_from_openai(state: dict[str, torch.Tensor]) -> CLIPModel:
    """A transformers ``CLIPModel`` holding the weights of an OpenAI-layout state dict."""
    config = openai_config(state)
    model = CLIPModel(config)
    tm, vm = "text_model.", "vision_model."
    weights = {
        f"{tm}embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{tm}embeddings.position_embedding.weight": state["positional_embedding"],
        f"{tm}final_layer_norm.weight": state["ln_final.weight"], f"{tm}final_layer_norm.bias": state["ln_final.bias"],
        f"{vm}embeddings.class_embedding": state["visual.class_embedding"],
        f"{vm}embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        f"{vm}embeddings.position_embedding.weight": state["visual.positional_embedding"],
        f"{vm}pre_layrnorm.weight": state["visual.ln_pre.weight"], f"{vm}pre_layrnorm.bias": state["visual.ln_pre.bias"],
        f"{vm}post_layernorm.weight": state["visual.ln_post.weight"],
        f"{vm}post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(), "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(model.logit_scale.shape),
        **_blocks(state, "transformer.", tm, config.text_config.num_hidden_layers),
        **_blocks(state, "visual.transformer.", vm, config.vision_config.num_hidden_layers),
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def load_openai_clip(path: str | Path) -> CLIPModel:
    """OpenAI's (or open_clip's) CLIP weights file as a transformers ``CLIPModel`` in fp32."""
    return clip_from_openai(read_state_dict(path))
