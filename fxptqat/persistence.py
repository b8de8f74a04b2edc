"""Saving and loading a fake-quant graph: state dict + recipe.

A GraphModule full of torch.ao modules does not pickle portably, so fxptqat saves what rebuilds
it: the recipe (QuantConfig, stage, trainable nodes, the measured error stats, the structure's
fingerprint) as plain data, and the state dict (weights, BN statistics, quantizer scales and
zero points, observer flags). ``load`` re-runs ``prepare`` on the user's model class and restores
both; the INT8 model is then ``lower(load(...))``, which is deterministic, so it computes exactly
what the saved graph's INT8 model computed. Both go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import torch
import torch.fx as fx
import torch.nn as nn

from . import api, meta
from .capture import bn_frozen
from .config import QuantConfig
from .errors import ConfigError, InputError, SelectionError
from .stats import ErrorStats

__all__ = ["save", "load"]

FORMAT = "fxptqat-recipe/1"
_JSONABLE = (bool, int, float, str, type(None))


def _config_to_dict(config: QuantConfig) -> dict:
    data = dataclasses.asdict(config)
    leaves = []
    for leaf in config.leaf_modules:
        leaves.append(leaf if isinstance(leaf, str) else f"class:{leaf.__module__}:{leaf.__qualname__}")
    data["leaf_modules"] = leaves
    if config.concrete_args is not None:
        if not all(isinstance(v, _JSONABLE) for v in config.concrete_args.values()):
            raise ConfigError(
                "save(): concrete_args holds values that are not plain data; pass the same QuantConfig "
                "to load(..., config=...) instead of relying on the saved one."
            )
        data["concrete_args"] = dict(config.concrete_args)
    return data


def _config_from_dict(data: dict) -> QuantConfig:
    data = {"act_observer": "minmax", **data}  # files saved before the option existed
    leaves = []
    for leaf in data.get("leaf_modules", []):
        if leaf.startswith("class:"):
            _, module, qualname = leaf.split(":", 2)
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            leaves.append(obj)
        else:
            leaves.append(leaf)
    return QuantConfig(**{**data, "leaf_modules": tuple(leaves)})


def save(qat: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``qat``'s recipe and state dict to ``path`` (one ``torch.save`` file)."""
    info = api.require(qat, meta.Stage.CALIBRATED, "save")
    nodes = {
        n.name: {
            "trainable": i.trainable,
            "isolated": dataclasses.asdict(i.isolated) if i.isolated else None,
            "propagated": dataclasses.asdict(i.propagated) if i.propagated else None,
        }
        for n, i in meta.quantized_nodes(qat)
    }
    owned = {id(qat.get_parameter(t)) for _, i in meta.quantized_nodes(qat) for t in i.parameters}
    bn_moving = any(bn_frozen(qat.get_submodule(n.target)) is False for n, i in meta.quantized_nodes(qat) if i.trainable)
    recipe = {
        "format": FORMAT,
        "bn_stats": "train" if bn_moving else "frozen",
        "float_params": "train" if any(p.requires_grad for p in qat.parameters() if id(p) not in owned) else "frozen",
        "config": _config_to_dict(info.config),
        "stage": int(info.stage),
        "fingerprint": meta.fingerprint(qat),
        "nodes": nodes,
    }
    torch.save({"recipe": recipe, "state_dict": qat.state_dict()}, path)


def load(
    model: nn.Module, example_inputs, path: str | os.PathLike, *, config: QuantConfig | None = None
) -> fx.GraphModule:
    """Rebuild a saved fake-quant graph from the user's float ``model`` (never mutated)."""
    try:
        blob = torch.load(path, weights_only=True)
        recipe = blob["recipe"]
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"load(): {path} is not a file written by fxptqat.save ({e}).") from e
    if recipe.get("format") != FORMAT:
        raise InputError(f"load(): {path} has format {recipe.get('format')!r}, expected {FORMAT!r}.")
    config = _config_from_dict(recipe["config"]) if config is None else config
    qat = api.prepare(model, example_inputs, config=config)
    if meta.fingerprint(qat) != recipe["fingerprint"]:
        raise SelectionError(
            f"load(): {path} was saved from a different model or config (quantized nodes differ); "
            "pass the same model class and QuantConfig it was saved with."
        )
    qat.load_state_dict(blob["state_dict"])  # FakeQuantize restores its flags from the buffers
    saved = recipe["nodes"]
    for node, _ in meta.quantized_nodes(qat):
        entry = saved[node.name]
        meta.update_node_info(
            node,
            isolated=ErrorStats(**entry["isolated"]) if entry["isolated"] else None,
            propagated=ErrorStats(**entry["propagated"]) if entry["propagated"] else None,
        )
    stage = meta.Stage(recipe["stage"])
    meta.update_graph_info(qat, stage=min(stage, meta.Stage.MEASURED))
    if stage >= meta.Stage.SELECTED:
        trainable = {name for name, entry in saved.items() if entry["trainable"]}
        api.apply_selection(
            qat, trainable, policy="loaded", bn_stats=recipe["bn_stats"], float_params=recipe["float_params"]
        )
    return qat
