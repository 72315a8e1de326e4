"""Training configs: a YAML file from configs/ plus `section.key=value` overrides from the command line.

The typed `__init__` arguments of AgeGenderModule, UTKFaceDataModule and lightning.Trainer are the one
source of truth for what each section may hold; unknown keys are rejected with the allowed ones named.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from models.errors import UserError
from training.data import UTKFaceDataModule
from training.module import AgeGenderModule

TOP_LEVEL = {"seed": 42, "name": "age_gender", "logdir": "runs", "early_stopping_patience": None}
SECTIONS = {
    "data": UTKFaceDataModule,  # image_size comes from model.image_size, seed from the top level
    "model": AgeGenderModule,
    "trainer": L.Trainer,
}
_NOT_CONFIGURABLE = {"self", "image_size", "seed"}
_UNSET = object()


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"lr": 0.1}} -> {"model.lr": 0.1}: a config as the dotted keys overrides use."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """The keys of two flat dicts whose values differ, a key missing from one included, sorted."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _UNSET) != new.get(k, _UNSET))


def allowed_keys(section: str) -> list[str]:
    params = inspect.signature(SECTIONS[section].__init__).parameters
    skip = _NOT_CONFIGURABLE if section == "data" else {"self"}
    return [p for p in params if p not in skip]


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def validate(cfg: dict) -> dict:
    unknown = set(cfg) - set(TOP_LEVEL) - set(SECTIONS)
    if unknown:
        raise UserError(f"unknown config key {sorted(unknown)[0]!r}; choose from {', '.join([*TOP_LEVEL, *SECTIONS])}")
    for section in SECTIONS:
        cfg.setdefault(section, {})
        if not isinstance(cfg[section], dict):
            raise UserError(f"config section {section!r} must be a mapping")
        allowed = allowed_keys(section)
        for key in cfg[section]:
            if key not in allowed:
                raise UserError(f"unknown key {section}.{key}; choose from {', '.join(allowed)}")
    if "metadata" not in cfg["data"]:
        raise UserError("the config needs data.metadata (a file written by `python -m training metadata`)")
    return {**TOP_LEVEL, **cfg}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; see configs/ for examples")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. model.lr=3e-4")
        set_key(cfg, key, yaml.safe_load(raw))
    return validate(cfg)
