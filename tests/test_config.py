"""Tests of dsmoe.config: YAML -> typed config, overrides, validation and DeepSpeed JSON composition."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dsmoe.config import DEFAULT_DEMO_CONFIG, ConfigError, RunConfig, load_config, run_config_from_dict, to_dict
from dsmoe.ds_config import CPU_ONLY, DeviceSupport, compose_ds_config, load_ds_config
from launch import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "dsmoe" / "configs"
RECIPES = sorted(CONFIG_DIR.glob("**/*.yaml")) + sorted(CONFIG_DIR.glob("**/*.yml"))
ZERO2 = REPO_ROOT / "ds_configs" / "zero2.json"


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _minimal(**sections) -> dict:
    data = {"data": {"shards": "/tmp/shards"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return data


def _cfg(**sections) -> RunConfig:
    cfg = run_config_from_dict(_minimal(**sections))
    cfg.validate()
    return cfg


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


# ---------------------------------------------------------------- YAML -> dataclasses


def test_unknown_key_names_the_full_key_and_the_closest(tmp_path):
    path = _write(tmp_path, _minimal(model={"imge_size": [64, 32]}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.imge_size" in message
    assert "did you mean 'model.image_size'" in message


def test_unknown_top_level_and_deep_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'methd'.*did you mean 'method'"):
        load_config(_write(tmp_path, _minimal(methd="dm_adapter")))
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'"):
        load_config(_write(tmp_path, _minimal(optim={"learning_rate": 1e-3})))
    with pytest.raises(ConfigError, match=r"adapter\.num_expert\b.*did you mean 'adapter\.num_experts'"):
        load_config(_write(tmp_path, _minimal(adapter={"num_expert": 4})))


@pytest.mark.parametrize("section,values,key", [
    ("train", {"epochs": "ten"}, "train.epochs"),
    ("train", {"epochs": True}, "train.epochs"),
    ("train", {"batch_size": 12.5}, "train.batch_size"),
    ("model", {"image_size": [64, 32, 3]}, "model.image_size"),
    ("model", {"image_size": 64}, "model.image_size"),
    ("model", {"image_size": ["tall", 32]}, "model.image_size[0]"),
    ("optim", {"lr": "fast"}, "optim.lr"),
    ("optim", {"betas": [0.9]}, "optim.betas"),
    ("data", {"augment": "yes"}, "data.augment"),
    ("data", {"shards": 5}, "data.shards"),
    ("adapter", {"capacity_factor": "big"}, "adapter.capacity_factor"),
])
def test_wrong_type_names_the_key(tmp_path, section, values, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, _minimal(**{section: values})))
    assert key in str(err.value)


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train"):
        load_config(_write(tmp_path, _minimal(train=[1, 2])))


@pytest.mark.parametrize("section,values,key,hint", [
    ("adapter", {"router": "domain-aware"}, "adapter.router", "domain_aware"),
    ("train", {"precision": "bf15"}, "train.precision", "bf16"),
    ("wandb", {"mode": "onlin"}, "wandb.mode", "online"),
])
def test_literal_values_are_checked(tmp_path, section, values, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, _minimal(**{section: values})))
    assert key in str(err.value) and f"did you mean '{hint}'" in str(err.value)


def test_literal_values_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal(adapter={"router": "linear"}, train={"precision": "fp32"})))
    assert cfg.adapter.router == "linear" and cfg.train.precision == "fp32"


def test_types_are_converted(tmp_path):
    text = ("data: {shards: /x}\noptim: {lr: 5e-3, weight_decay: 0, betas: [0.9, 0.98]}\n"
            "model: {image_size: [32, 16]}\nadapter: {capacity_factor: 2}\n")
    cfg = load_config(_write(tmp_path, text))
    assert cfg.optim.lr == 5e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 5e-3 as a string
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.model.image_size == (32, 16) and isinstance(cfg.model.image_size, tuple)
    assert cfg.adapter.capacity_factor == 2.0 and isinstance(cfg.adapter.capacity_factor, float)


def test_overrides_are_nested_and_yaml_typed(tmp_path):
    path = _write(tmp_path, _minimal(optim={"lr": 1e-4}))
    cfg = load_config(path, ["optim.lr=5e-3", "adapter.num_experts=4", "adapter.ep_size=2",
                             "model.image_size=[32, 16]", "data.val_split=null", "wandb.enabled=true",
                             "train.max_steps=7", "adapter.capacity_factor=1.5", "train.output_dir=runs/x=y"])
    assert cfg.optim.lr == 5e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.adapter.num_experts == 4 and cfg.adapter.ep_size == 2
    assert cfg.model.image_size == (32, 16)
    assert cfg.data.val_split is None
    assert cfg.wandb.enabled is True
    assert cfg.train.max_steps == 7
    assert cfg.adapter.capacity_factor == 1.5
    assert cfg.train.output_dir == "runs/x=y"
    # the file itself is untouched and the defaults of untouched keys remain
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 1e-4
    assert cfg.train.epochs == RunConfig().train.epochs


def test_override_errors_name_the_key(tmp_path):
    path = _write(tmp_path, _minimal())
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["adapter.num_experts"])
    with pytest.raises(ConfigError, match=r"adapter\.num_expert\b"):
        load_config(path, ["adapter.num_expert=4"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="clip"):
        load_config(path, ["model.clip.name=x"])
    # validation runs after the overrides
    with pytest.raises(ConfigError, match="top_k"):
        load_config(path, ["adapter.top_k=9"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))


def test_load_config_none_is_the_demo_recipe():
    cfg = load_config(None)
    assert DEFAULT_DEMO_CONFIG.is_file()
    raw = yaml.safe_load(DEFAULT_DEMO_CONFIG.read_text())
    assert cfg.demo is True and cfg.method == "dm_adapter"
    flat = dict(_walk(to_dict(cfg)))
    for key, value in _walk(raw):
        expected = float(value) if isinstance(value, str) and isinstance(flat[key], float) else value
        assert flat[key] == expected, key


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    # a recipe's world: the smallest launch its expert parallelism allows must pass the world checks
    ep = cfg.adapter.ep_size if cfg.adapter.router != "dense" else 1
    world = next(w for w in range(ep, 8 * ep + 1, ep) if cfg.train.batch_size % (w * cfg.train.grad_accum) == 0)
    cfg.check_world(world)
    # round trip through the YAML-safe dict
    assert run_config_from_dict(to_dict(cfg)) == cfg
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg))) == to_dict(cfg)


def test_recipes_exist():
    assert DEFAULT_DEMO_CONFIG in RECIPES


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("adapter,match", [
    ({"num_experts": 6, "top_k": 7}, "top_k"),
    ({"num_experts": 6, "top_k": 0}, "top_k"),
    ({"num_experts": 6, "ep_size": 4}, "ep_size"),
    ({"num_experts": 6, "ep_size": 0}, "ep_size"),
])
def test_validate_rejects_inconsistent_adapters(adapter, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(adapter=adapter)


def test_validate_accepts_consistent_and_dense_adapters():
    _cfg(adapter={"num_experts": 6, "top_k": 6, "ep_size": 3})
    _cfg(adapter={"router": "dense", "num_experts": 1, "top_k": 2, "ep_size": 5})  # MoE fields unused


@pytest.mark.parametrize("sections,match", [
    ({"model": {"image_size": [0, 32]}}, "image_size"),
    ({"model": {"text_length": 1}}, "text_length"),
    ({"dm_adapter": {"caption_corruption": 1.0}}, "caption_corruption"),
    ({"train": {"batch_size": 0}}, "batch_size"),
    ({"data": {"shards": ""}}, "shards"),
])
def test_validate_other_errors(sections, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**sections)


def test_empty_shards_allowed_for_the_demo():
    _cfg(data={"shards": ""}, demo=True)


def test_check_world():
    cfg = _cfg(adapter={"num_experts": 6, "ep_size": 2}, train={"batch_size": 32, "grad_accum": 2})
    cfg.check_world(2)
    cfg.check_world(4)
    assert cfg.micro_batch(4) == 4
    with pytest.raises(ConfigError, match="ep_size"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="batch_size"):
        cfg.check_world(6)  # 6 % 2 == 0 but 32 % (6 x 2) != 0
    dense = _cfg(adapter={"router": "dense", "ep_size": 2}, train={"batch_size": 30})
    dense.check_world(3)  # ep_size is meaningless without experts


# ---------------------------------------------------------------- DeepSpeed JSON


def test_shipped_zero2_composes_cleanly():
    raw = load_ds_config(ZERO2)
    original = copy.deepcopy(raw)
    cfg = _cfg(train={"batch_size": 32, "grad_accum": 2}, optim={"lr": 3e-3, "grad_clip": 1.0, "adamw": True,
                                                                  "betas": [0.9, 0.98], "eps": 1e-6})
    ds = compose_ds_config(raw, cfg, world_size=2, device=CPU_ONLY)
    assert raw == original, "the input dict must not be modified"
    assert not [k for k, v in _walk(ds) if v == "auto"]
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "Adam"
    assert params["lr"] == 3e-3 and params["betas"] == [0.9, 0.98] and params["eps"] == 1e-6
    assert params["weight_decay"] == cfg.optim.weight_decay and params["adam_w_mode"] is True
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    json.dumps(ds)


GPU = DeviceSupport(cuda=True, bf16=True, fp16=True)
V100 = DeviceSupport(cuda=True, bf16=False, fp16=True)


@pytest.mark.parametrize("precision,device,expected", [
    ("auto", CPU_ONLY, False), ("auto", GPU, True), ("auto", V100, False), ("fp32", GPU, False),
    ("bf16", CPU_ONLY, True)])
@pytest.mark.parametrize("section", [{"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, {}])
def test_bf16_auto_follows_precision(precision, device, expected, section):
    cfg = _cfg(train={"batch_size": 8, "precision": precision})
    ds = compose_ds_config(section, cfg, 1, device)
    assert ds["bf16"]["enabled"] is expected
    assert ds.get("fp16", {"enabled": False})["enabled"] is False


@pytest.mark.parametrize("ds,precision,match", [
    ({"bf16": {"enabled": True}}, "fp32", "train.precision is fp32 but the DeepSpeed JSON runs bf16"),
    ({"bf16": {"enabled": False}}, "bf16", "runs fp32"),
    ({"fp16": {"enabled": True}}, "bf16", "runs fp16"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "auto", "both fp16 and bf16"),
])
def test_json_precision_must_agree_with_yaml(ds, precision, match):
    with pytest.raises(ConfigError, match=match):
        compose_ds_config(ds, _cfg(train={"batch_size": 8, "precision": precision}), 1, GPU)


def test_half_precision_follows_what_deepspeed_supports_on_the_device():
    cfg = _cfg(train={"batch_size": 8})
    fp16_json = load_ds_config(REPO_ROOT / "ds_configs" / "zero2_fp16.json")
    ds = compose_ds_config(fp16_json, cfg, 2, DeviceSupport(cuda=False, bf16=True, fp16=True))  # AVX512-FP16 CPU
    assert ds["fp16"]["enabled"] is True and "bf16" not in ds
    with pytest.raises(ConfigError, match="fp16 .* not supported by DeepSpeed on this device"):
        compose_ds_config(fp16_json, cfg, 2, CPU_ONLY)
    assert compose_ds_config(fp16_json, cfg, 2, V100)["fp16"]["enabled"] is True
    with pytest.raises(ConfigError, match="bf16 is not supported on this device"):
        compose_ds_config(load_ds_config(REPO_ROOT / "ds_configs" / "zero2_bf16.json"), cfg, 2, V100)


def test_missing_optimizer_section_is_added():
    cfg = _cfg(train={"batch_size": 8}, optim={"lr": 1e-3})
    ds = compose_ds_config({}, cfg, 2, CPU_ONLY)
    assert ds["optimizer"]["type"] == "Adam"
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["weight_decay"] == cfg.optim.weight_decay
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1


def test_explicit_values_are_kept():
    cfg = _cfg(train={"batch_size": 8})
    ds = compose_ds_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.5}},
                            "gradient_clipping": 2.0}, cfg, 2, CPU_ONLY)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.5
    assert ds["gradient_clipping"] == 2.0


@pytest.mark.parametrize("ds,match", [
    ({"zero_optimization": {"stage": 3}}, "stage 3"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_batch_size": 64}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": 2}, "train_batch_size"),
    ({"optimizer": {"type": "SGD"}}, "SGD"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
    ({"activation_checkpointing": {"partition_activations": "auto"}}, "activation_checkpointing"),
])
def test_compose_refuses_bad_json(ds, match):
    cfg = _cfg(train={"batch_size": 16})
    with pytest.raises(ConfigError, match=match):
        compose_ds_config(ds, cfg, 2, CPU_ONLY)


def test_load_ds_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"train_batch_size\": }")
    with pytest.raises(ConfigError, match="JSON"):
        load_ds_config(bad)


# ---------------------------------------------------------------- methods own their sections


def test_an_unknown_method_is_refused_with_the_known_ones(tmp_path):
    known = r"\(known: dasd, dm_adapter, full, lora\)"
    with pytest.raises(ConfigError, match=r"method: 'irra' is not a method dsmoe knows " + known):
        load_config(_write(tmp_path, _minimal(method="irra")))


def test_each_method_reads_its_own_section(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal(dm_adapter={"lb_weight": 0.25})))
    assert type(cfg.method_config).__name__ == "DMAdapterConfig" and cfg.method_config.lb_weight == 0.25
    assert to_dict(cfg)["dm_adapter"]["lb_weight"] == 0.25 and "method_config" not in to_dict(cfg)
    with pytest.raises(ConfigError, match="section 'dasd' belongs to method dasd; this config's method is dm_adapter"):
        load_config(_write(tmp_path, _minimal(dasd={"languages": ["de"]})))
    with pytest.raises(ConfigError, match="unknown key 'method_config'"):
        load_config(_write(tmp_path, _minimal(method_config={})))


@pytest.mark.parametrize("old,new", [("loss.lb_weight", "dm_adapter.lb_weight"),
                                     ("adapter.image_scale", "dm_adapter.image_scale"),
                                     ("dasd.init_from", "train.init_from")])
def test_keys_that_moved_say_where_to(tmp_path, old, new):
    section, key = old.split(".")
    with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'"):
        load_config(_write(tmp_path, _minimal(**{section: {key: 1}})))


def test_a_new_method_registers_itself_without_touching_the_shared_config(tmp_path):
    from dataclasses import dataclass

    from dsmoe.methods import registry

    @dataclass
    class EchoConfig(registry.MethodSettings):
        width: int = 3

    registry.register("echo", EchoConfig, "builtins:repr")
    try:
        cfg = load_config(_write(tmp_path, _minimal(method="echo", echo={"width": 5})))
        assert cfg.method_config == EchoConfig(width=5) and cfg.stage_runs() == [cfg]
        assert registry.get_method(cfg) == repr(cfg)  # built by the registered "module:function"
    finally:
        registry._METHODS.pop("echo")


def test_adam_without_bias_correction_selects_deepspeeds_own_adam():
    """BertAdam (DASD's release) has no bias correction: torch's Adam cannot leave it out, DeepSpeed's can."""
    plain = compose_ds_config(load_ds_config(ZERO2), _cfg(train={"batch_size": 8}), 2, CPU_ONLY)
    assert plain["optimizer"]["params"]["torch_adam"] is True and "bias_correction" not in plain["optimizer"]["params"]
    bert = compose_ds_config(load_ds_config(ZERO2), _cfg(train={"batch_size": 8}, optim={"bias_correction": False}),
                             2, CPU_ONLY)
    assert bert["optimizer"]["params"]["torch_adam"] is False
    assert bert["optimizer"]["params"]["bias_correction"] is False
    pinned = load_ds_config(ZERO2)
    pinned["optimizer"]["params"]["torch_adam"] = True
    with pytest.raises(ConfigError, match="bias_correction false needs DeepSpeed's own Adam"):
        compose_ds_config(pinned, _cfg(train={"batch_size": 8}, optim={"bias_correction": False}), 2, CPU_ONLY)


def test_paper_recipes_use_the_releases_optimiser_constants():
    for name in ("cuhk_pedes", "icfg_pedes", "rstpreid"):
        optim = load_config(CONFIG_DIR / "dm_adapter" / f"{name}.yaml").optim
        assert (optim.eps, optim.betas, optim.weight_decay, optim.bias_lr_factor, optim.no_decay) == \
            (1e-3, (0.9, 0.999), 4e-5, 2.0, "bias")
    for name in ("multi30k_finetune", "multi30k_zero_shot", "coco_finetune", "coco_zero_shot", "msrvtt_finetune"):
        optim = load_config(CONFIG_DIR / "dasd" / f"{name}.yaml").optim
        assert (optim.eps, optim.betas, optim.weight_decay, optim.adamw, optim.grad_clip, optim.warmup_ratio) == \
            (1e-6, (0.9, 0.98), 0.2, True, 1.0, 0.1), name


def test_a_run_folder_moved_and_resumed_with_its_own_config_says_where_it_trains(tmp_path, capsys):
    from dsmoe.train import parse_args, prepare

    old, moved = tmp_path / "old", tmp_path / "moved"
    moved.mkdir()
    (moved / "metrics.jsonl").write_text("")
    config = load_config(None, [f"train.output_dir={old}"])
    (moved / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    prepare(parse_args(["--config", str(moved / "config.yaml")]), 2)
    out = capsys.readouterr().out
    assert (f"note: {moved / 'config.yaml'} is the config of the run folder {moved}, but it names "
            f"train.output_dir {old}: this run trains in {old} (to continue the run in {moved}, add --set "
            f"train.output_dir={moved})") in out
    prepare(parse_args(["--config", str(moved / "config.yaml"), "--set", f"train.output_dir={moved}"]), 2)
    assert "note:" not in capsys.readouterr().out
