"""Checkpointer: bit-identical round trip (state + data position), sharded restore, keep-N, corrupt-checkpoint
fallback, config mismatch, refusal to save non-finite state."""

import glob
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import get_config

CFG = get_config("tiny")


def _state(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": {"w": jax.random.normal(k[0], (64, 96)), "layers": [jax.random.normal(k[1], (8,)),
                                                                     jnp.zeros((3,), jnp.bfloat16)]},
        "step": jnp.int32(7),
        "rng": jax.random.key_data(k[2]),
    }


def _iterator():
    ds = grain.MapDataset.range(1000).shuffle(seed=3).map(lambda i: np.full((2,), i, np.int32)).batch(4)
    return iter(ds.to_iter_dataset())


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def _abstract(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), state)


def test_round_trip_is_bit_identical_and_resumes_the_data(tmp_path):
    it = _iterator()
    for _ in range(5):
        next(it)
    state = _state()
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(5, state, config=CFG, data_state=it.get_state(), meta={"note": "x"})
    expected_next = [next(it) for _ in range(3)]  # the run goes on after the (async) save
    ck.close()

    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    got = ck.restore(_abstract(state), config=CFG)
    assert got.step == 5 and got.meta["note"] == "x"
    assert _same(got.state, state)
    fresh = _iterator()
    fresh.set_state(got.data_state)
    for want in expected_next:
        np.testing.assert_array_equal(next(fresh), want)


def test_restore_lands_in_the_target_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    state = {"w": jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)}
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    ck.save(1, state, config=CFG)
    ck.wait()
    target = {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))}
    got = ck.restore(target)
    assert got.state["w"].sharding == target["w"].sharding
    assert len(got.state["w"].addressable_shards) == 8
    assert got.state["w"].addressable_shards[0].data.shape == (8, 8)
    np.testing.assert_array_equal(got.state["w"], state["w"])


def test_keeps_the_newest_n(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, _state(step), config=CFG)
    ck.wait()
    assert ck.steps() == [3, 4]


# Orbax leaves a coroutine un-awaited when a read fails part-way; that is its noise, not a failure here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, caplog):
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
    ck.save(1, _state(1), config=CFG)
    ck.save(2, _state(2), config=CFG)
    ck.close()
    if damage == "meta":
        with open(os.path.join(tmp_path, "2", "meta", "metadata"), "w") as f:
            f.write("{")
    else:
        files = [f for f in glob.glob(os.path.join(tmp_path, "2", "state", "**"), recursive=True) if os.path.isfile(f)]
        biggest = max(files, key=os.path.getsize)
        size = os.path.getsize(biggest)
        with open(biggest, "r+b") as f:
            if damage == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size // 3)
                f.write(os.urandom(64))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
    with caplog.at_level("WARNING"):
        got = ck.restore(_abstract(_state()))
    assert got.step == 1 and _same(got.state, _state(1))
    assert "checkpoint step 2 is unusable" in caplog.text
    assert ck.steps() == [1]
    assert glob.glob(os.path.join(tmp_path, "2.corrupt-*"))  # moved aside, not deleted
    ck.save(2, _state(2), config=CFG)  # the step can be written again
    ck.close()


def test_config_mismatch_names_the_fields(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    ck.save(1, _state(), config=CFG)
    ck.wait()
    other = get_config("tiny", hidden_size=32, num_hidden_layers=4, compress_ratios=(0, 4, 16, 4, 0))
    with pytest.raises(ckpt_lib.ConfigMismatchError) as e:
        ck.restore(_abstract(_state()), config=other)
    msg = str(e.value)
    assert "\n" not in msg
    for field in ("hidden_size (checkpoint 64, now 32)", "num_hidden_layers", "compress_ratios"):
        assert field in msg
    assert "vocab_size" not in msg
    ck.close()


def test_never_saves_non_finite_state(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    bad = _state()
    bad["params"]["w"] = bad["params"]["w"].at[3, 4].set(jnp.inf)
    with pytest.raises(ValueError, match="NaN or inf"):
        ck.save(1, bad, config=CFG)
    ck.close()
    assert ck.steps() == []


def test_nested_dict_round_trip_of_custom_pytrees():
    from flax import nnx

    class M(nnx.Module):
        def __init__(self):
            self.a = nnx.Param(jnp.ones((2,)))
            self.b = nnx.List([nnx.Param(jnp.zeros((3,)))])

    state = nnx.state(M())
    nested = ckpt_lib.to_nested(state)
    assert set(nested) == {"a", "b"}
    back = ckpt_lib.from_nested(nested, state)
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_execution_fields_may_change_and_new_fields_take_their_defaults(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    ck.save(1, _state(), config=CFG)
    ck.wait()
    # Continued training of the same model under FP4 QAT, bf16 compute and remat: allowed, and reported.
    changed = ck.check_config(CFG.replace(quant="fp4", dtype="bfloat16", remat_policy="full"))
    assert changed == ["dtype (checkpoint float32, now bfloat16)", "quant (checkpoint none, now fp4)",
                       "remat_policy (checkpoint none, now full)"]
    assert ck.check_config(CFG) == []
    ck.close()
    # A checkpoint written before a field existed: the field's default stands in for it.
    saved = CFG.to_dict()
    del saved["moe_impl"], saved["quant"]
    assert ckpt_lib._diff_configs(saved, CFG) == [] and ckpt_lib._diff_configs(saved, CFG, execution=True) == []
    assert ckpt_lib._diff_configs(saved, CFG.replace(quant="fp8"), execution=True) == [
        "quant (checkpoint none, now fp8)"]


def test_on_disk_names_of_a_train_state_are_fixed():
    """`to_nested` names every level by its dict key, attribute name or list index, and keeps the `value` of every
    nnx.Variable: these are the array names on disk, so checkpoints written before must keep restoring."""
    from flax import nnx

    from deepseek_v4 import DeepseekV4, train

    cfg = get_config("tiny")
    tx = train.make_optimizer(train.TrainSettings())
    _, state = train.abstract_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), tx, 0)

    def names(tree, prefix=()):
        if isinstance(tree, dict):
            return [n for k, v in tree.items() for n in names(v, prefix + (k,))]
        return ["/".join(prefix)]

    got = set(names(ckpt_lib.to_nested(state)))
    for name in ("step", "rng", "skipped", "params/embed/value", "params/stack/blocks/0/attn/wq_b/value",
                 "params/prefix/0/ffn/experts/w1/value", "extras/prefix/0/ffn/tid2eid/value",
                 "extras/mtp/0/block/ffn/router_bias/value", "opt_state/inner_states/adamw/inner_state/0/count",
                 "opt_state/inner_states/adamw/inner_state/0/mu/embed/value",
                 "opt_state/inner_states/adamw/inner_state/0/nu/mtp/0/norm/scale/value",
                 "opt_state/inner_states/muon/inner_state/0/momentum/stack/blocks/1/ffn/experts/w2/value",
                 "opt_state/inner_states/muon/inner_state/2/count"):
        assert name in got, name
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert len(got) == len(leaves)
    for path, _ in leaves:  # each level: DictKey -> key, GetAttrKey -> name, SequenceKey -> index
        assert "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path) in got


def test_a_writer_finishes_the_tmp_cleanup_before_it_returns(tmp_path):
    """A run that stops before its first save must not leave Orbax's cleanup thread running at exit."""
    directory = tmp_path / "checkpoints"
    leftover = directory / "7.orbax-checkpoint-tmp-1700000000"  # an interrupted save
    (leftover / "state").mkdir(parents=True)
    ckpt = ckpt_lib.Checkpointer(str(directory))
    try:
        assert not leftover.exists()  # removed before the constructor returned, not later in the background
        assert ckpt.steps() == []
    finally:
        ckpt.close()
    reader_leftover = directory / "8.orbax-checkpoint-tmp-1700000001"
    reader_leftover.mkdir()
    ckpt_lib.Checkpointer(str(directory), read_only=True).close()
    assert reader_leftover.exists()  # a reader removes nothing
