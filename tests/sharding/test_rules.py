"""The logical-axis table: specs, collisions, divisibility fallback, constraints, sharded creation, summary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4.params import path_str
from sharding import mesh as mesh_lib
from sharding import rules

V, D, Q, N, H, E, F = 32, 16, 8, 4, 8, 8, 8

# Every logical name the model's parameter tree uses (README of the model tree), plus activation names.
BRIEF_NAMES = ["vocab", "embed", "hc_in", "layers", "q_lora", "heads", "head_dim", "o_groups", "o_group_in", "o_lora",
               "o_proj", "compress_dim", "embed_out", "experts", "expert_mlp", "mlp", "index_heads", "index_head_dim",
               "batch", "seq"]


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh("data=2,fsdp=2,expert=2")


def test_every_brief_name_has_a_row():
    for name in BRIEF_NAMES:
        for kind in ("param", "activation"):
            rules.spec((name,), kind)


def test_table_placements():
    assert rules.spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert rules.spec(("experts", "embed", "expert_mlp")) == P("expert", "fsdp", "tensor")
    assert rules.spec(("batch", "seq", "embed"), "activation") == P(("data", "fsdp", "expert"), "context", None)
    assert rules.spec(("batch", "seq", "vocab"), "activation") == P(("data", "fsdp", "expert"), "context", "tensor")
    assert rules.spec(("layers", "embed", None)) == P(None, "fsdp", None)


def test_a_mesh_axis_is_used_once_first_dimension_wins():
    assert rules.spec(("embed", "q_lora")) == P("fsdp", None)
    assert rules.spec(("q_lora", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert rules.spec(("o_groups", "o_group_in", "o_lora")) == P("tensor", "fsdp", None)
    # batch claims "expert" first, so an experts dimension of the same activation is not split again.
    assert rules.spec(("batch", "experts"), "activation") == P(("data", "fsdp", "expert"), None)
    for s in (rules.spec(("embed", "embed")), rules.spec(("batch", "batch"), "activation")):
        flat = [a for e in s for a in rules.axes_of(e)]
        assert len(flat) == len(set(flat))


def test_divisibility_fallback_and_size_one_axes(mesh):
    # batch 4 on data=2,fsdp=2,expert=2: the longest dividing prefix (data, fsdp); tensor (size 1) left out.
    assert rules.spec(("batch", "vocab"), "activation", shape=(4, 32), mesh=mesh) == P(("data", "fsdp"), None)
    assert rules.spec(("batch",), "activation", shape=(8,), mesh=mesh) == P(("data", "fsdp", "expert"))
    assert rules.spec(("batch",), "activation", shape=(3,), mesh=mesh) == P(None)
    tp = mesh_lib.make_mesh("fsdp=4,tensor=2")
    assert rules.spec(("q_lora", "heads", "head_dim"), shape=(8, 3, 8), mesh=tp) == P("fsdp", None, None)
    assert rules.spec(("q_lora", "heads", "head_dim"), shape=(6, 4, 8), mesh=tp) == P(None, "tensor", None)


def test_bad_names_and_ranks():
    with pytest.raises(ValueError, match="logical axis 'embd' has no row"):
        rules.spec(("embd",))
    with pytest.raises(ValueError, match="do not match shape"):
        rules.spec(("embed",), shape=(2, 3))
    with pytest.raises(ValueError, match="kind must be"):
        rules.spec(("embed",), "weights")


def test_constrain(mesh):
    x = jnp.ones((8, 4))
    assert rules.constrain(x, ("batch", "embed")) is x  # no mesh: no-op
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: rules.constrain(a * 2, ("batch", "embed")))(x)
        inside = jax.jit(jax.shard_map(lambda a: rules.constrain(a, ("batch", "embed")), mesh=mesh,
                                       in_specs=P("data"), out_specs=P("data")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp", "expert"), None)), 2)
    np.testing.assert_array_equal(np.asarray(y), 2.0)
    np.testing.assert_array_equal(np.asarray(inside), 1.0)


class Bias(nnx.Variable):
    pass


def det(shape, offset=0.0):
    """A deterministic, cheap-to-compile initial value (the tests are about layout, not randomness)."""
    return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32) + offset).reshape(shape)


class Layer(nnx.Module):
    def __init__(self, rngs):
        def p(shape, axes):
            return nnx.Param(det(shape, len(axes)), logical_axes=axes)

        self.wq_a = p((D, Q), ("embed", "q_lora"))
        self.wq_b = p((Q, N, H), ("q_lora", "heads", "head_dim"))
        self.w1 = p((E, D, F), ("experts", "embed", "expert_mlp"))
        self.w2 = p((E, F, D), ("experts", "expert_mlp", "embed"))
        self.router_bias = Bias(jnp.zeros((E,)))


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Param(det((V, D)), logical_axes=("vocab", "embed"))
        self.layer = Layer(rngs)
        self.scale = nnx.Param(jnp.ones((D,)), logical_axes=("embed",))


def test_param_shardings_model_and_optimizer_state(mesh):
    model = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
    sh = rules.param_shardings(model, mesh)
    assert sh["layer"]["w1"].get_value().spec == P("expert", "fsdp", None)
    assert sh["layer"]["wq_b"].get_value().spec == P("fsdp", None, None)
    assert sh["layer"]["router_bias"].get_value().spec == P()
    opt = nnx.eval_shape(lambda: nnx.Optimizer(Toy(nnx.Rngs(0)), optax.adamw(1e-3), wrt=nnx.Param))
    opt_sh = rules.param_shardings(nnx.state(opt), mesh)
    mu = [v.get_value().spec for p, v in jax.tree_util.tree_flatten_with_path(opt_sh, is_leaf=rules.is_variable)[0]
          if "mu" in path_str(p) and path_str(p).endswith("layer.w1")]
    assert mu == [P("expert", "fsdp", None)]


def test_param_without_logical_axes_is_an_error(mesh):
    class Bad(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)))

    with pytest.raises(ValueError, match="parameter w .* has no logical_axes"):
        rules.param_shardings(nnx.eval_shape(Bad), mesh)


def test_shard_model_matches_unsharded_construction(mesh):
    model = rules.shard_model(lambda: Toy(nnx.Rngs(0)), mesh)
    with nnx.use_eager_sharding(False):
        plain = Toy(nnx.Rngs(0))
    w1 = model.layer.w1.get_value()
    assert w1.sharding.spec == P("expert", "fsdp", None)
    assert {s.data.shape for s in w1.addressable_shards} == {(E // 2, D // 2, F)}
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_summary_table(mesh):
    text = rules.summary(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))), mesh)
    lines = text.splitlines()
    assert lines[0] == "sharding summary, mesh data=2,fsdp=2,expert=2,context=1,tensor=1"
    assert lines[1].split() == ["parameter", "logical", "axes", "shape", "dtype", "spec", "bytes/device"]
    row = next(ln for ln in lines if ln.startswith("layer.w1 "))
    assert row.split()[-1] == f"{E // 2 * D // 2 * F * 4:,}"
    assert "[expert, fsdp, -]" in row
    total = (V * D // 2 + D * Q // 2 + Q * N * H // 2 + 2 * E // 2 * D // 2 * F + E + D // 2) * 4
    assert lines[-1].endswith(f"{total:,} bytes per device ({rules._human(total)})")
