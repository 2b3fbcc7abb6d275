"""Muon (hybrid Newton-Schulz, RMS matching, sharded orthogonalisation) and the Muon/AdamW routing table."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4 import muon, optim
from deepseek_v4.muon import MatrixSpec
from deepseek_v4.params import path_str
from tests.conftest import TOLERANCES

# ---- Newton-Schulz ------------------------------------------------------------------------------------


def _with_spectrum(rng, m, n, cond):
    """An m x n matrix whose singular values are log-spaced from 1 down to 1/cond."""
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    s = np.zeros((m, n))
    s[:k, :k] = np.diag(np.logspace(0, -np.log10(cond), k))
    return (u @ s @ v.T).astype(np.float32)


def _sv(x):
    return np.linalg.svd(np.asarray(x, np.float32), compute_uv=False)


@pytest.fixture(scope="module")
def ns():
    return jax.jit(muon.newton_schulz)


@pytest.mark.parametrize("shape", [(24, 72), (72, 24), (48, 48)])
def test_newton_schulz_singular_values_batched_over_experts(ns, shape):
    """An expert stack [E, in, out] in bf16 (random, condition number 1e3, tiny and large scale): every
    expert's singular values end in [0.9, 1.1], each expert orthogonalised on its own."""
    rng = np.random.default_rng(0)
    experts = [rng.normal(size=shape), _with_spectrum(rng, *shape, 1e3), 1e-3 * rng.normal(size=shape),
               50 * _with_spectrum(rng, *shape, 1e3)]
    x = jnp.asarray(np.stack(experts), jnp.bfloat16)  # [E, in, out]
    y = ns(x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    for e in range(len(experts)):
        s = _sv(y[e])
        assert s.min() >= 0.9 and s.max() <= 1.1, (e, s.min(), s.max())
    # A well-conditioned expert's result is its orthogonal polar factor U V^T, not just some orthogonal matrix.
    u, _, vt = np.linalg.svd(np.asarray(x[0], np.float32), full_matrices=False)
    assert np.abs(np.asarray(y[0], np.float32) - u @ vt).max() < 0.02


def test_newton_schulz_scalar_map_and_its_limit():
    """The V4 schedule's scalar map: sigma/||X||_F >= 1.6e-5 ends in [0.9, 1.1], >= 1e-4 in [1, 1.003];
    far below it a direction is not amplified enough."""
    s0 = np.logspace(-4.75, 0, 4000)
    s = s0.copy()
    for a, b, c in muon.V4_COEFFICIENTS:
        s = a * s + b * s**3 + c * s**5
    assert s.min() >= 0.9 and s.max() <= 1.1
    assert s[s0 >= 1e-4].min() >= 0.9999 and s[s0 >= 1e-4].max() <= 1.003
    tiny = np.array([1e-6])
    for a, b, c in muon.V4_COEFFICIENTS:
        tiny = a * tiny + b * tiny**3 + c * tiny**5
    assert tiny[0] < 0.5  # the measured limit: a square matrix with cond 1e5 keeps a direction near 0.1


def test_newton_schulz_matches_optax_for_one_triple():
    """A single triple repeated (float32 compute) equals optax's own Newton-Schulz."""
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    x = jnp.asarray(np.random.default_rng(2).normal(size=(20, 36)), jnp.float32)
    ours = muon.newton_schulz(x, muon.FAST_COEFFICIENTS, 5, compute_dtype=jnp.float32, eps=1e-8)
    theirs = orthogonalize_via_newton_schulz(x, jnp.asarray(muon.FAST_COEFFICIENTS), 5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5)


def test_newton_schulz_bad_arguments(ns):
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="steps"):
        muon.newton_schulz(x, muon.FAST_COEFFICIENTS)
    with pytest.raises(ValueError, match="disagrees"):
        muon.newton_schulz(x, muon.V4_COEFFICIENTS, steps=5)
    with pytest.raises(ValueError, match="triples"):
        muon.newton_schulz(x, [(1.0, 2.0)])
    with pytest.raises(ValueError, match="matrix"):
        muon.newton_schulz(jnp.ones(4))
    assert not np.any(np.asarray(ns(jnp.zeros((4, 48, 48), jnp.bfloat16))))  # zero gradient -> zero update


# ---- the Muon transformation -------------------------------------------------------------------------


# Shapes shared with the Newton-Schulz tests above, so the reference reuses their compiled function.
SPECS = {"experts": MatrixSpec(1, 1), "wq_b": MatrixSpec(1, 1)}  # [E, D, F]; stacked [L, Q, N, H] -> L x [Q, N*H]
MU, LR, WD = 0.95, 0.5, 0.1


@pytest.fixture(scope="module")
def muon_steps():
    """Two Muon steps (lr 0.5, wd 0.1) on an expert stack and a stacked 3-D projection."""
    rng = np.random.default_rng(3)
    params = {"experts": rng.normal(size=(4, 24, 72)), "wq_b": rng.normal(size=(4, 48, 4, 12))}
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    grads = [jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params) for _ in range(2)]
    tx = muon.muon(LR, weight_decay=WD, spec_fn=lambda path, shape: SPECS[path])
    update = jax.jit(tx.update)
    state, updates = tx.init(params), []
    for g in grads:
        u, state = update(g, state, params)
        updates.append(u)
    return params, grads, updates


def test_muon_update_rms_is_0_18(muon_steps):
    params, _, updates = muon_steps
    for name, u in updates[0].items():
        k, r, c = SPECS[name].split(u.shape)
        o = -np.asarray(u) / LR - WD * np.asarray(params[name])  # the scaled orthogonal part
        rms = np.sqrt(np.mean(np.square(o.reshape(k, r, c)), axis=(1, 2)))  # per expert / per layer
        np.testing.assert_allclose(rms, 0.18, rtol=0.02, err_msg=name)


def test_muon_momentum_nesterov_and_weight_decay(ns, muon_steps):
    """Two steps against a direct restatement of V4's Algorithm 1."""
    params, grads, updates = muon_steps
    momentum = jax.tree.map(jnp.zeros_like, params)
    for g, got in zip(grads, updates):
        momentum = jax.tree.map(lambda m, gi: MU * m + gi, momentum, g)
        for name in params:
            k, r, c = SPECS[name].split(params[name].shape)
            direction = (MU * momentum[name] + g[name]).reshape(k, r, c).astype(jnp.bfloat16)
            o = ns(direction).astype(jnp.float32).reshape(params[name].shape) * 0.18 * math.sqrt(max(r, c))
            want = -LR * (o + WD * params[name])
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=name)


def test_muon_rejects_a_leaf_without_matrix_spec():
    tx = muon.muon(0.1, spec_fn=lambda path, shape: None)
    with pytest.raises(ValueError, match="no matrix spec"):
        tx.init({"bias": jnp.zeros((4, 4))})


# ---- routing -----------------------------------------------------------------------------------------

BATCH_AXES = {"layers", "experts", "o_groups"}


def expected_route(path):
    """The routing table of the issue, stated independently of the parameter table deepseek_v4.params.PARAMS."""
    parts = path.split(".")
    last, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if path in ("embed", "head"):
        return "adamw"
    if last == "scale" and parent.endswith("norm"):
        return "adamw"  # RMSNorm weights
    if parent in ("hc_attn", "hc_ffn", "hc_head"):
        return "muon" if last == "fn" else "adamw"  # mHC: dynamic projection / static bias and gate
    if last in ("attn_sink", "ape"):
        return "adamw"  # open cases, decided in deepseek_v4/optim.py
    if last in ("router_bias", "tid2eid"):
        return "frozen"
    return "muon"


def _hand_built_tree():
    """Brief's parameter paths, Flash-like widths scaled down (D=64, R=4)."""
    d, r, q, n, h, g, o, e, f, v, hi, ni = 64, 4, 32, 4, 16, 2, 16, 8, 24, 100, 8, 2
    hc = (2 + r) * r

    def layer(prefix, lead=(), csa=True, hash_layer=False):
        s = lambda *shape: jax.ShapeDtypeStruct(lead + shape, jnp.float32)  # noqa: E731
        t = {
            "attn_norm.scale": s(d), "ffn_norm.scale": s(d),
            "attn.wq_a": s(d, q), "attn.q_norm.scale": s(q), "attn.wq_b": s(q, n, h), "attn.wkv": s(d, h),
            "attn.kv_norm.scale": s(h), "attn.wo_a": s(g, n * h // g, o), "attn.wo_b": s(g * o, d),
            "attn.attn_sink": s(n), "attn.compressor.wkv": s(d, 2 * h), "attn.compressor.wgate": s(d, 2 * h),
            "attn.compressor.ape": s(4, 2 * h), "attn.compressor.norm.scale": s(h),
            "ffn.gate": s(d, e), "ffn.experts.w1": s(e, d, f), "ffn.experts.w3": s(e, d, f),
            "ffn.experts.w2": s(e, f, d), "ffn.shared.w1": s(d, f), "ffn.shared.w3": s(d, f), "ffn.shared.w2": s(f, d),
        }
        for k in ("attn", "ffn"):
            t.update({f"hc_{k}.fn": s(r * d, hc), f"hc_{k}.base": s(hc), f"hc_{k}.scale": s(3)})
        if csa:
            t.update({"attn.indexer.wq_b": s(q, ni, hi), "attn.indexer.weights_proj": s(d, ni),
                      "attn.indexer.compressor.wkv": s(d, 2 * hi), "attn.indexer.compressor.wgate": s(d, 2 * hi),
                      "attn.indexer.compressor.ape": s(4, 2 * hi), "attn.indexer.compressor.norm.scale": s(hi)})
        frozen = {"ffn.tid2eid": jax.ShapeDtypeStruct(lead + (v, 2), jnp.int32)} if hash_layer else {
            "ffn.router_bias": s(e)}
        return {f"{prefix}.{k}": x for k, x in t.items()}, {f"{prefix}.{k}": x for k, x in frozen.items()}

    params = {"embed": jax.ShapeDtypeStruct((v, d), jnp.float32), "head": jax.ShapeDtypeStruct((d, v), jnp.float32),
              "norm.scale": jax.ShapeDtypeStruct((d,), jnp.float32)}
    params.update({f"hc_head.{k}": jax.ShapeDtypeStruct(sh, jnp.float32)
                   for k, sh in (("fn", (r * d, r)), ("base", (r,)), ("scale", (1,)))})
    frozen = {}
    for name, kw in (("prefix.0", dict(csa=False, hash_layer=True)), ("stack.0", dict(lead=(3,))),
                     ("stack.1", dict(lead=(3,), csa=False)), ("mtp.0", dict(csa=False))):
        p, fz = layer(name, **kw)
        params.update(p)
        frozen.update(fz)
    for k in ("e_proj", "h_proj"):
        params[f"mtp.0.{k}"] = jax.ShapeDtypeStruct((d, d), jnp.float32)
    for k in ("enorm.scale", "hnorm.scale", "norm.scale"):
        params[f"mtp.0.{k}"] = jax.ShapeDtypeStruct((d,), jnp.float32)
    return params, frozen


def test_routing_hand_built_tree():
    params, frozen = _hand_built_tree()
    rows = optim.plan(params, frozen)
    assert len(rows) == len(params) + len(frozen)
    for row in rows:
        assert row.route == expected_route(row.path), row
    by_path = {row.path: row for row in rows}
    assert by_path["stack.0.ffn.experts.w1"].matrices == (3 * 8, 64, 24)  # one matrix per layer and expert
    assert by_path["stack.0.attn.wo_a"].matrices == (3 * 2, 32, 16)  # one per layer and output group
    assert by_path["prefix.0.attn.wq_b"].matrices == (1, 32, 4 * 16)  # [Q, N, H] -> [Q, N*H]
    assert by_path["hc_head.fn"].matrices == (1, 256, 4)
    labels = optim.param_labels(params)
    assert labels["stack.1.attn.attn_sink"] == "adamw" and labels["stack.1.ffn.experts.w2"] == "muon"
    assert set(optim.param_labels(params, "adamw").values()) == {"adamw"}


def test_routing_errors():
    with pytest.raises(ValueError, match="matches no row"):
        optim.route_of("prefix.0.attn.new_thing", (4, 4))
    with pytest.raises(ValueError, match="rank 3 plus the leading layers axis"):
        optim.route_of("stack.0.attn.wq_b", (4, 4, 4))
    with pytest.raises(ValueError, match="non-trainable"):
        optim.param_labels({"prefix.0.ffn.router_bias": jnp.zeros(4)})
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make_optimizer("sgd")


def test_routing_every_flash_parameter():
    """Every parameter of the real Flash model (abstract, nothing allocated) routes as the table says, and
    Muon's batch axes are exactly the parameter's layers / experts / o_groups logical axes."""
    from deepseek_v4 import DeepseekV4, get_config
    from deepseek_v4.layers import HashTable, RouterBias

    model = nnx.eval_shape(lambda: DeepseekV4(get_config("flash"), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    frozen = nnx.state(model, (RouterBias, HashTable))
    param_paths = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any(p.endswith(("router_bias", "tid2eid")) for p in param_paths)  # never seen by the optimizer
    rows = optim.plan(params, frozen)
    variables = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
    totals = {}
    for row in rows:
        assert row.route == expected_route(row.path), row
        totals[row.route] = totals.get(row.route, 0) + row.size
        if row.route != "muon":
            continue
        axes = variables[row.path].get_metadata()["logical_axes"]
        batch = optim.route_of(row.path, row.shape).matrix.batch_dims
        assert set(axes[:batch]) <= BATCH_AXES and not set(axes[batch:]) & BATCH_AXES, (row.path, axes)
    assert totals["frozen"] > 0 and totals["adamw"] > 0
    assert totals["muon"] + totals["adamw"] == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert 250e9 < totals["muon"] + totals["adamw"] < 320e9  # Flash: 284B parameters


# ---- sharded Newton-Schulz ---------------------------------------------------------------------------

# Two parameter-like stacks of 16 matrices each, so each of the 8 devices must own exactly 2 whole matrices.
# Together they cover: a batch axis already sharded (expert), matrix dims sharded by one and by two mesh
# axes, axes the leaf is replicated on (tensor; expert), tall matrices (transposed) and merged dims.
SHARDED = {
    # W[L, E_expert, D_fsdp, F]: per device 8 experts -> all-to-all over fsdp -> share of tensor -> 2.
    "experts": ((2, 8, 32, 16), P(None, "expert", "fsdp", None), MatrixSpec(2, 1)),
    # W[L, Q_(fsdp,expert), N_tensor, H] -> L matrices [Q, N*H]: all-to-alls over tensor, expert, fsdp.
    "wq_b": ((16, 32, 4, 16), P(None, ("fsdp", "expert"), "tensor", None), MatrixSpec(1, 1)),
}
PATHS = {"experts": "stack.blocks.0.ffn.experts.w1", "wq_b": "stack.blocks.0.attn.wq_b"}
# bf16 iterates: the sharded program sums the Frobenius norm in another order, which flips a few bf16
# roundings that 10 steps carry to a few ulps of the ~0.1-sized entries; a wrong matrix would be off by ~0.1.
TOL = TOLERANCES["muon_sharded_vs_single_bf16"]


def _mesh(axis_type):
    return jax.make_mesh((1, 2, 2, 2), ("data", "fsdp", "expert", "tensor"), axis_types=(axis_type,) * 4)


@pytest.fixture(scope="module")
def sharded_case():
    rng = np.random.default_rng(4)
    tree = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, (s, _, _) in SHARDED.items()}
    specs = {k: v[2] for k, v in SHARDED.items()}
    reference = jax.jit(lambda t: muon.orthogonalize(t, specs, mesh=None)).lower(tree).compile()
    return tree, specs, reference, reference(tree)


def _dot_shapes(hlo):
    return [tuple(int(v) for v in m.group(1).split(",")) for m in re.finditer(r"= \w+\[([\d,]+)\]\S* dot\(", hlo)]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_newton_schulz_equals_unsharded_without_replication(sharded_case, axis_type):
    tree, specs, reference, want = sharded_case
    mesh = _mesh(axis_type)
    pspecs = {k: v[1] for k, v in SHARDED.items()}
    sharded = {k: jax.device_put(x, NamedSharding(mesh, pspecs[k])) for k, x in tree.items()}
    # Auto axes: the specs are passed; Explicit axes: they come from the arrays' types.
    given = pspecs if axis_type == AxisType.Auto else None
    fn = jax.jit(lambda t: muon.orthogonalize(t, specs, mesh=mesh, partition_specs=given))
    with jax.set_mesh(mesh):
        compiled = fn.lower(sharded).compile()
        out = compiled(sharded)
    for k in tree:
        assert out[k].sharding.is_equivalent_to(NamedSharding(mesh, pspecs[k]), out[k].ndim), k
        err = np.abs(np.asarray(out[k]) - np.asarray(want[k]))
        assert err.max() < TOL and err.mean() < TOL / 20, (k, err.max(), err.mean())
    # No replicated Newton-Schulz: every matmul of the per-device program works on 2 = 16/8 whole matrices
    # (the single-device program on all 16), and the per-device FLOPs are an eighth of the single-device ones.
    assert {s[0] for s in _dot_shapes(reference.as_text())} == {16}
    dots = _dot_shapes(compiled.as_text())
    assert dots and all(len(s) == 3 and s[0] == 2 for s in dots), dots
    for k, (shape, _, spec) in SHARDED.items():
        _, r, c = spec.split(shape)
        assert (2, min(r, c), max(r, c)) in dots, k  # the whole matrix, wide orientation
    ratio = compiled.cost_analysis()["flops"] / reference.cost_analysis()["flops"]
    assert ratio < 0.2, ratio  # replicated work would give >= 1; the rest is per-device copies and padding
    assert "all-to-all" in compiled.as_text()


def test_make_optimizer_sharded(sharded_case):
    """The full optimizer (clipping + Muon + AdamW) on sharded parameters, first step in closed form:
    Muon leaves -lr (0.18 sqrt(max(r, c)) NS(W) + wd W) for gradient = W; the AdamW leaf -lr (sign(g) + wd W)."""
    tree, _, _, ortho = sharded_case
    params = {PATHS[k]: x for k, x in tree.items()} | {"stack.blocks.0.attn.attn_sink": jnp.full((16, 4), 0.5)}
    grads = dict(params) | {"stack.blocks.0.attn.attn_sink": jnp.tile(jnp.array([1.0, -2.0, 3.0, -4.0]), (16, 1))}
    mesh = _mesh(AxisType.Auto)
    pspecs = {PATHS[k]: v[1] for k, v in SHARDED.items()} | {"stack.blocks.0.attn.attn_sink": P(None, "tensor")}
    shard = lambda t: {k: jax.device_put(x, NamedSharding(mesh, pspecs[k])) for k, x in t.items()}  # noqa: E731
    lr, wd = 1e-2, 0.1
    tx = optim.make_optimizer("muon", lr, weight_decay=wd, mesh=mesh, partition_specs=pspecs)
    with jax.set_mesh(mesh):
        got = jax.jit(tx.update)(shard(grads), tx.init(shard(params)), shard(params))[0]
    for k, path in PATHS.items():
        _, r, c = SHARDED[k][2].split(params[path].shape)
        want = -lr * (0.18 * math.sqrt(max(r, c)) * ortho[k] + wd * params[path])
        assert got[path].sharding.is_equivalent_to(NamedSharding(mesh, pspecs[path]), want.ndim)
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want), atol=lr * TOL * 0.18 * math.sqrt(max(r, c)))
    sink = "stack.blocks.0.attn.attn_sink"
    want = -lr * (jnp.sign(grads[sink]) + wd * params[sink])
    np.testing.assert_allclose(np.asarray(got[sink]), np.asarray(want), rtol=1e-5)


# ---- the whole optimizer on an NNX module, and schedules ---------------------------------------------


class _Scale(nnx.Module):
    def __init__(self, dim):
        self.scale = nnx.Param(jnp.ones(dim))


class _Layer(nnx.Module):
    def __init__(self, rngs):
        from deepseek_v4.layers import RouterBias

        self.attn = nnx.Module()
        self.attn.wq_a = nnx.Param(0.1 * jax.random.normal(rngs.params(), (16, 24)))
        self.ffn = nnx.Module()
        self.ffn.experts = nnx.Module()
        self.ffn.experts.w2 = nnx.Param(0.1 * jax.random.normal(rngs.params(), (2, 24, 16)))
        self.ffn.router_bias = RouterBias(jnp.zeros(2))


class _Tiny(nnx.Module):
    """A few parameters at the model's paths, and a non-trainable router bias."""

    def __init__(self, rngs):
        self.embed = nnx.Param(0.1 * jax.random.normal(rngs.params(), (32, 16)))
        self.prefix = nnx.List([_Layer(rngs)])
        self.norm = _Scale(16)
        self.head = nnx.Param(0.1 * jax.random.normal(rngs.params(), (16, 32)))

    def __call__(self, tokens):
        layer = self.prefix[0]
        x = self.embed[...][tokens]
        h = jnp.tanh(x @ layer.attn.wq_a[...])
        x = x + jnp.einsum("btf,efd->btd", h, layer.ffn.experts.w2[...]) + layer.ffn.router_bias[...].sum()
        return (x * self.norm.scale[...]) @ self.head[...]


def test_make_optimizer_trains_an_nnx_module():
    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 32)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens).mean()

    @nnx.jit
    def step(m, o):
        value, grads = nnx.value_and_grad(loss)(m)
        o.update(m, grads)
        return value

    for name in ("muon",):
        model = _Tiny(nnx.Rngs(0))
        tx = optim.make_optimizer(name, optim.make_schedule("constant", 0.02, 10, warmup_steps=0))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0]]
        assert not any("router_bias" in p for p in paths)
        assert any("ffn.experts.w2" in p for p in paths)
        losses = [float(step(model, opt)) for _ in range(6)]
        assert losses[-1] < losses[0] - 0.2, (name, losses)
        assert float(model.prefix[0].ffn.router_bias[...].sum()) == 0.0


def test_schedules():
    wsd = optim.warmup_stable_decay(2.7e-4, 1000, warmup_steps=100, decay_steps=200)
    assert float(wsd(0)) == 0.0
    np.testing.assert_allclose([float(wsd(50)), float(wsd(100)), float(wsd(500)), float(wsd(800))],
                               [1.35e-4, 2.7e-4, 2.7e-4, 2.7e-4], rtol=1e-5)
    np.testing.assert_allclose([float(wsd(900)), float(wsd(1000)), float(wsd(5000))],
                               [(2.7e-4 + 2.7e-5) / 2, 2.7e-5, 2.7e-5], rtol=1e-4)
    cos = optim.make_schedule("cosine", 1e-3, 1000, warmup_steps=10, end_value=1e-4)
    np.testing.assert_allclose([float(cos(10)), float(cos(505)), float(cos(1000))], [1e-3, 5.5e-4, 1e-4], rtol=1e-4)
    with pytest.raises(ValueError, match="exceed"):
        optim.warmup_stable_decay(1e-3, 100, warmup_steps=80, decay_steps=40)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.make_schedule("step", 1e-3, 100)
