"""The parameter table (deepseek_v4/params.py): it covers every variable of the presets exactly once, every row
is used, and the one path formatter."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, interop, layers, optim, params

PRESETS = ("tiny", "flash", "pro")


@functools.cache
def _placements(preset):
    """(variables by path, rows placed at each path, layer indices placed at each path) of a preset."""
    cfg = get_config(preset)
    model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    variables = {params.path_str(path): var for path, var in nnx.to_flat_state(nnx.state(model))}
    kinds, layers_of = {}, {}
    for group in interop.tensor_groups(cfg):
        for kind in group.kinds:
            key = group.prefix + kind.path
            if key in variables:
                kinds.setdefault(key, set()).add(kind)
                layers_of.setdefault(key, []).append(group.layer)
    return variables, kinds, layers_of


@pytest.mark.parametrize("preset", PRESETS)
def test_every_variable_has_exactly_one_row(preset):
    """Each variable is placed by exactly one row (once per layer of a scanned stack), the row's rank and route
    agree with the variable, and the route lookup finds the same row."""
    variables, kinds, layers_of = _placements(preset)
    assert sorted(kinds) == sorted(variables), set(variables) ^ set(kinds)
    for key, var in variables.items():
        assert len(kinds[key]) == 1, (key, kinds[key])
        (kind,) = kinds[key]
        stacked = key.startswith("stack.")
        shape = var.get_value().shape
        assert len(shape) == kind.ndim + stacked, (key, shape, kind)
        assert sorted(layers_of[key], key=lambda i: -1 if i is None else i) == (
            list(range(shape[0])) if stacked else [None]), key
        assert params.kind_of(key) is kind, key
        assert (kind.route == params.FROZEN) == (not isinstance(var, nnx.Param)), key
        assert optim.route_of(key, shape).route == kind.route


def test_no_row_is_unused():
    """The tiny, flash and pro presets together use every row of the table."""
    used = {kind.path for preset in PRESETS for ks in _placements(preset)[1].values() for kind in ks}
    assert used == set(params.BY_PATH), set(params.BY_PATH) - used


def test_table_rows_are_consistent():
    assert len(params.BY_PATH) == len(params.PARAMS)
    for k in params.PARAMS:
        assert k.route in (params.MUON, params.ADAMW, params.FROZEN), k
        assert (k.matrix is not None) == (k.route == params.MUON), k
        assert k.scopes and set(k.scopes) <= {params.MODEL, params.LAYER, params.MTP}, k
        assert k.transform in params.TRANSFORMS and k.storage in (params.FP8, params.EXPERT, params.BF16,
                                                                   params.F32, params.I64), k
        assert (k.storage == params.EXPERT) == (k.transform == "experts") == ("{e}" in k.official), k
        assert (k.storage == params.I64) == (k.transform == "hash"), k
        assert (k.fp8_layout is None) == (k.storage not in (params.FP8, params.EXPERT)), k
    assert params.BY_PATH["attn.wq_b"].fp8_layout == "heads"
    assert params.BY_PATH["attn.wo_a"].fp8_layout == "grouped"
    assert params.BY_PATH["ffn.experts.w1"].fp8_layout == "matrix"


def test_kind_of_scopes():
    assert params.kind_of("mtp.0.norm.scale").path == "norm.scale"
    assert params.kind_of("stack.blocks.1.attn.indexer.compressor.norm.scale").path == (
        "attn.indexer.compressor.norm.scale")
    assert params.kind_of("mtp.0.block.attn.compressor.ape").path == "attn.compressor.ape"
    with pytest.raises(ValueError, match="matches no row"):
        params.kind_of("mtp.0.embed")  # root-only rows match only at the root
    with pytest.raises(ValueError, match="matches no row"):
        params.kind_of("prefix.0.attn.new_thing")


def test_qweight_takes_its_layout_from_the_table():
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="no FP8/FP4 layout"):
        layers.qweight(jnp.zeros((4, 4)), cfg, "ffn.gate")
    with pytest.raises(ValueError, match="not a parameter path"):
        layers.qweight(jnp.zeros((4, 4)), cfg, "attn.nothing")
    w = jnp.zeros((4, 4))
    assert layers.qweight(w, cfg, "attn.wq_a") is w  # cfg.quant == "none"


def test_path_str_and_path_keys():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(2))
            self.blocks = nnx.List([nnx.Param(jnp.ones(1))])

    state = nnx.state(M())
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert [params.path_str(p) for p in paths] == ["blocks.0", "w"]  # the Variable's trailing `value` dropped
    assert [params.path_keys(p) for p in paths] == [["blocks", "0", "value"], ["w", "value"]]
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    assert [params.path_str(p) for p, _ in leaves] == ["blocks.0", "w"]
    assert [params.path_str(p) for p, _ in nnx.to_flat_state(state)] == ["blocks.0", "w"]
    assert params.path_str((jax.tree_util.GetAttrKey("opt_state"), jax.tree_util.SequenceKey(1),
                            jax.tree_util.DictKey("mu"))) == "opt_state.1.mu"
