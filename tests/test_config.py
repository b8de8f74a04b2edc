"""QuantConfig: defaults, validation with typed errors and "did you mean", derived ranges."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn as nn

import fxptqat as fq
from fxptqat.config import ENGINES, check_finite


class Block(nn.Module):
    def forward(self, x):
        return x


def test_defaults():
    c = fq.QuantConfig()
    assert c.weight_bits == 8
    assert c.act_bits == 8
    assert c.per_channel is True
    assert c.engine == "x86"
    assert c.reduce_range is False
    assert c.leaf_modules == ()
    assert c.concrete_args is None
    assert c.weight_qrange == (-127, 127)
    assert c.act_qrange == (0, 255)


def test_equal_configs_compare_and_hash_equal():
    assert fq.QuantConfig(weight_bits=4) == fq.QuantConfig(weight_bits=4)
    assert fq.QuantConfig(weight_bits=4) != fq.QuantConfig(weight_bits=5)
    assert hash(fq.QuantConfig(weight_bits=4)) == hash(fq.QuantConfig(weight_bits=4))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_weight_bits_in_range_accepted(bits):
    assert fq.QuantConfig(weight_bits=bits).weight_bits == bits


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 16])
def test_weight_bits_out_of_range_rejected(bits):
    with pytest.raises(fq.ConfigError, match=r"weight_bits.*2 to 8"):
        fq.QuantConfig(weight_bits=bits)


@pytest.mark.parametrize("bits", [True, False, "4", 4.0, None])
def test_weight_bits_wrong_type_rejected(bits):
    with pytest.raises(fq.ConfigError, match="weight_bits must be an int"):
        fq.QuantConfig(weight_bits=bits)


@pytest.mark.parametrize("bits", [8, None])
def test_act_bits_accepted(bits):
    assert fq.QuantConfig(act_bits=bits).act_bits == bits


@pytest.mark.parametrize("bits", [4, 16, 7, True, "8"])
def test_act_bits_rejected(bits):
    with pytest.raises(fq.ConfigError, match=r"act_bits=.*not supported.*None"):
        fq.QuantConfig(act_bits=bits)


@pytest.mark.parametrize("engine", ENGINES)
def test_known_engines_accepted(engine):
    assert fq.QuantConfig(engine=engine).engine == engine


def test_unknown_engine_suggests_closest():
    with pytest.raises(fq.ConfigError, match=r"engine='x68'.*Did you mean 'x86'\?"):
        fq.QuantConfig(engine="x68")
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'qnnpack'\?"):
        fq.QuantConfig(engine="qnnpak")


def test_unknown_engine_without_close_match_lists_choices():
    with pytest.raises(fq.ConfigError) as info:
        fq.QuantConfig(engine="tensorrt")
    msg = str(info.value)
    assert "Did you mean" not in msg
    for engine in ENGINES:
        assert engine in msg


def test_misspelt_option_name_suggests_the_right_one():
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'weight_bits'\?") as info:
        fq.QuantConfig(weigth_bits=4)
    assert "weigth_bits" in str(info.value)
    assert "Valid options" in str(info.value)


def test_unknown_option_without_close_match():
    with pytest.raises(fq.ConfigError, match="has no option 'zzz'") as info:
        fq.QuantConfig(zzz=1)
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize("name", ["per_channel", "reduce_range"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bool_options_require_bool(name, value):
    with pytest.raises(fq.ConfigError, match=f"{name} must be True or False"):
        fq.QuantConfig(**{name: value})


@pytest.mark.parametrize("bits, expected", [(2, (-1, 1)), (3, (-3, 3)), (4, (-7, 7)), (8, (-127, 127))])
def test_weight_qrange_is_restricted_symmetric(bits, expected):
    assert fq.QuantConfig(weight_bits=bits).weight_qrange == expected


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_qrange_fits_int8_and_is_symmetric(bits):
    lo, hi = fq.QuantConfig(weight_bits=bits).weight_qrange
    assert lo == -hi
    assert hi - lo + 1 == 2**bits - 1  # one code of the full range is given up
    assert -128 < lo and hi <= 127


def test_act_qrange():
    assert fq.QuantConfig(reduce_range=False).act_qrange == (0, 255)
    assert fq.QuantConfig(reduce_range=True).act_qrange == (0, 127)
    assert fq.QuantConfig(act_bits=None).act_qrange is None
    assert fq.QuantConfig(act_bits=None, reduce_range=True).act_qrange is None


def test_frozen():
    c = fq.QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weight_bits = 4  # type: ignore[misc]
    assert c.weight_bits == 8


def test_replace_revalidates():
    c = fq.QuantConfig(weight_bits=4)
    assert dataclasses.replace(c, weight_bits=6).weight_bits == 6
    with pytest.raises(fq.ConfigError):
        dataclasses.replace(c, weight_bits=12)


def test_leaf_modules_accepts_classes_and_names_and_becomes_tuple():
    c = fq.QuantConfig(leaf_modules=[Block, "backbone.block1"])
    assert c.leaf_modules == (Block, "backbone.block1")
    assert isinstance(c.leaf_modules, tuple)
    hash(c)  # a list would make the frozen config unhashable


@pytest.mark.parametrize("leaf", [Block(), 3, int, None, nn.Linear(2, 2)])
def test_leaf_modules_rejects_non_module_classes(leaf):
    with pytest.raises(fq.ConfigError, match="leaf_modules holds"):
        fq.QuantConfig(leaf_modules=(leaf,))


def test_leaf_modules_bare_class_is_one_leaf():
    assert fq.QuantConfig(leaf_modules=Block).leaf_modules == (Block,)
    with pytest.raises(fq.ConfigError):
        fq.QuantConfig(leaf_modules=3)


def test_leaf_modules_bare_string_is_not_split_into_characters():
    try:
        c = fq.QuantConfig(leaf_modules="block")
    except fq.ConfigError:
        return  # rejecting is fine too
    assert c.leaf_modules == ("block",)


def test_concrete_args_must_be_a_mapping():
    assert fq.QuantConfig(concrete_args={"flag": True}).concrete_args == {"flag": True}
    with pytest.raises(fq.ConfigError, match="concrete_args must map"):
        fq.QuantConfig(concrete_args=[("flag", True)])


def test_check_finite():
    assert check_finite("o", "x", 3) == 3.0
    assert isinstance(check_finite("o", "x", 3), float)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(fq.ConfigError, match="must be finite"):
            check_finite("o", "x", bad)
    for bad in (True, "1", None):
        with pytest.raises(fq.ConfigError, match="must be a number"):
            check_finite("o", "x", bad)
    with pytest.raises(fq.ConfigError, match=">= 0"):
        check_finite("o", "x", -1e-9, minimum=0.0)
    assert check_finite("o", "x", 0.0, minimum=0.0) == 0.0


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        fq.QuantConfig(weight_bits=9)


def test_quantized_ops_choices():
    assert fq.QuantConfig().quantized_ops == "all"
    assert fq.QuantConfig(quantized_ops="weighted").quantized_ops == "weighted"
    with pytest.raises(fq.ConfigError, match=r"quantized_ops='weigted'.*Did you mean 'weighted'\?"):
        fq.QuantConfig(quantized_ops="weigted")


@pytest.mark.parametrize("bits, expected", [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))])
def test_full_weight_range_takes_every_signed_code(bits, expected):
    config = fq.QuantConfig(weight_bits=bits, weight_range="full")
    assert config.weight_qrange == expected and config.weight_max_code == -expected[0]
    assert fq.QuantConfig(weight_bits=bits).weight_max_code == expected[1]


def test_weight_range_is_checked():
    with pytest.raises(fq.ConfigError, match=r"weight_range='ful' is not supported. Did you mean 'full'\?"):
        fq.QuantConfig(weight_range="ful")
