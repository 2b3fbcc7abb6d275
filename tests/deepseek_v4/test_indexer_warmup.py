"""The indexer warm-up phase: the phase table, its settings errors, a warm-up step that trains only the indexer
(everything else bit for bit unchanged), and a run resumed from a checkpoint taken mid warm-up.

The step mechanics use the toy model of test_train.py plus one indexer parameter whose loss stands in for the
indexer KL (it reaches only that parameter, as the model's stop-gradients make the real KL do); the real model's
warm-up step is the slow test at the end.
"""

import dataclasses
import glob
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import train
from deepseek_v4.config import get_config
from deepseek_v4.synthetic import SyntheticIterator
from experiments import run as run_lib
from tests.deepseek_v4.test_train import _SETTINGS, D, V, _batch, _Toy

# Steps [0, 2) dense, [2, 4) indexer warm-up, [4, 6) sparse.
_PHASED = dict(_SETTINGS, steps=6, decay_fraction=0.5, sparse_attention_after=4, indexer_warmup_steps=2,
               indexer_warmup_lr=5e-2)


class _Indexer(nnx.Module):
    def __init__(self, rngs):
        self.weights_proj = nnx.Param(jax.random.normal(rngs.params(), (D, 2)) * 0.3,
                                      logical_axes=("embed", "index_heads"))


class _Attn(nnx.Module):
    def __init__(self, rngs):
        self.indexer = _Indexer(rngs)


class _ToyWithIndexer(_Toy):
    """The toy plus `attn.indexer.weights_proj`, trained by a loss on the detached hidden state."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.attn = _Attn(rngs)

    def forward_train(self, tokens, segment_ids, positions, *, sparse_attention=True, indexer_loss=False):
        out = super().forward_train(tokens, segment_ids, positions, sparse_attention=sparse_attention,
                                    indexer_loss=indexer_loss)
        pred = jax.lax.stop_gradient(out.hidden) @ self.attn.indexer.weights_proj[...]
        return dataclasses.replace(out, indexer_loss=jnp.mean(jnp.square(pred - 1.0)))


def _build():
    return _ToyWithIndexer(nnx.Rngs(0))


@pytest.fixture(scope="module")
def phased():
    s = train.TrainSettings(**_PHASED)
    tx = train.make_optimizer(s)
    graphdef, _ = train.init_state(_build(), tx, 0, train.make_indexer_warmup_optimizer(s))
    steps = {p: train.make_train_step(graphdef, get_config("tiny"), tx, s, phase=p) for p in train.PHASES}
    return types.SimpleNamespace(s=s, tx=tx, graphdef=graphdef, steps=steps,
                                 state=lambda: train.init_state(_build(), tx, 0,
                                                                train.make_indexer_warmup_optimizer(s))[1])


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)  # copies: the step donates its input


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _nowhere_same(a, b) -> bool:
    return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_phase_table():
    s = train.TrainSettings(steps=10, sparse_attention_after=6, indexer_warmup_steps=2)
    assert [train.csa_phase(s, i) for i in range(10)] == ["dense"] * 4 + ["warmup"] * 2 + ["sparse"] * 4
    assert s.optimizer_steps == 8  # the main schedule runs over the non-warm-up steps
    plain = train.TrainSettings(steps=10, sparse_attention_after=3)  # no warm-up: as before
    assert [train.csa_phase(plain, i) for i in range(5)] == ["dense"] * 3 + ["sparse"] * 2
    assert [train.sparse_at(plain, i) for i in range(5)] == [False] * 3 + [True] * 2
    assert train.TrainSettings(steps=10).optimizer_steps == 10
    assert train.make_indexer_warmup_optimizer(plain) is None


@pytest.mark.parametrize("overrides, message", [
    (dict(indexer_warmup_steps=10, sparse_attention_after=10), r"indexer_warmup_steps \(10\) must be shorter than "
                                                               r"the run \(steps=10\)"),
    (dict(indexer_warmup_steps=3, sparse_attention_after=2), r"indexer_warmup_steps \(3\) exceeds "
                                                             r"sparse_attention_after \(2\)"),
    (dict(indexer_warmup_steps=3, sparse_attention_after=11), r"ends at sparse_attention_after \(11\), after the "
                                                              r"run's last step"),
    (dict(indexer_warmup_steps=3, sparse_attention_after=5, indexer_weight=0.0), r"needs indexer_weight > 0"),
    (dict(indexer_warmup_steps=-1), r"indexer_warmup_steps must be >= 0"),
    (dict(indexer_warmup_lr=0.0), r"indexer_warmup_lr must be a positive number"),
])
def test_bad_warmup_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        train.TrainSettings(**{**dict(steps=10, warmup_steps=1), **overrides})
    assert "\n" not in str(e.value)


def test_a_warmup_needs_a_csa_layer():
    s = train.TrainSettings(steps=10, warmup_steps=1, sparse_attention_after=5, indexer_warmup_steps=2)
    no_csa = get_config("tiny", num_hidden_layers=2, compress_ratios=(16, 0, 0))
    with pytest.raises(ValueError, match=r"indexer_warmup_steps \(2\) needs a CSA layer") as e:
        train.check_settings_for_config(s, no_csa)
    assert "\n" not in str(e.value)
    train.check_settings_for_config(s, get_config("tiny"))
    train.check_settings_for_config(train.TrainSettings(steps=10, warmup_steps=1), no_csa)  # no warm-up: fine


def test_a_warmup_step_trains_only_the_indexer(phased):
    state = phased.state()
    before = _copy(state)
    new, m = phased.steps["warmup"](state, jax.tree.map(jnp.asarray, _batch()))
    after = _copy(new)
    idx_before, rest_before = train.split_indexer(before.params)
    idx_after, rest_after = train.split_indexer(after.params)
    assert bool(m["update_ok"]) and int(after.step) == 1 and int(after.skipped) == 0
    # Bit for bit: the main parameters, the main optimizer state, the router biases.
    assert _same(rest_before, rest_after)
    assert _same(before.opt_state, after.opt_state)
    assert _same(before.extras, after.extras)
    # The indexer moved, with its own optimizer at its own learning rate.
    assert _nowhere_same(idx_before, idx_after)
    assert _nowhere_same(before.indexer_opt_state, after.indexer_opt_state)
    assert float(m["lr"]) == pytest.approx(0.05)
    assert int(train.main_optimizer_count(new)) == 0  # the main schedule did not advance
    # A sparse step then trains everything (the indexer with the main optimizer) and leaves the warm-up's state.
    newer, m2 = phased.steps["sparse"](new, jax.tree.map(jnp.asarray, _batch(seed=1)))
    final = _copy(newer)
    assert _nowhere_same(after.params, final.params) and _nowhere_same(after.opt_state, final.opt_state)
    assert _same(after.indexer_opt_state, final.indexer_opt_state)
    assert float(m2["lr"]) == float(train.learning_rate_schedule(phased.s)(0))
    assert int(train.main_optimizer_count(newer)) == 1


def test_a_non_finite_warmup_step_changes_nothing(phased):
    state = phased.state()
    before = _copy(state)
    poisoned = _batch()
    poisoned["loss_weights"] = np.ones(poisoned["tokens"].shape, np.float32)
    poisoned["loss_weights"][0, 0] = np.nan  # the total loss is NaN, so its gradient for the indexer is too
    new, m = phased.steps["warmup"](state, jax.tree.map(jnp.asarray, poisoned))
    assert not bool(m["update_ok"]) and int(new.skipped) == 1
    after = _copy(new)
    for field in ("params", "extras", "opt_state", "indexer_opt_state"):
        assert _same(getattr(before, field), getattr(after, field)), field
    assert int(train.main_optimizer_count(new)) == 0


def _opts(workdir, **kw):
    return run_lib.RunSettings(workdir=str(workdir), batch_size=8, seq_len=12, save_every=3, log_every=1,
                               keep_checkpoints=5, tensorboard=False, plot=False, progress=False, compilation_cache="",
                               peak_flops=1e12, **kw)


def _setup(workdir, s, steps_cache):
    def make_step(graphdef, cfg, tx, settings, *, phase):  # one compile per (settings, phase) for all runs
        if (settings, phase) not in steps_cache:
            steps_cache[settings, phase] = train.make_train_step(graphdef, cfg, tx, settings, phase=phase)
        return steps_cache[settings, phase]

    opts = _opts(workdir)
    return run_lib.setup(get_config("tiny"), s, opts, workdir=str(workdir), model_name="toy",
                         data_source=lambda i, n: SyntheticIterator(opts.batch_size, opts.seq_len, 0, V),
                         make_step=make_step, build_model=_build)


def _train_until(run, stop_at: int) -> int:
    """`train_loop` stopped (as by SIGTERM) once `stop_at` steps are taken: it saves there and returns."""
    stop = types.SimpleNamespace(signal=None)
    step_fn = run.step_fn

    def stopping_step_fn(step):
        if step == stop_at - 1:
            stop.signal = 15  # seen after this step: saved, then the loop ends
        return step_fn(step)

    run.step_fn = stopping_step_fn
    return run_lib.train_loop(run, stop).step


def test_a_checkpoint_taken_in_the_warmup_resumes_in_the_warmup(tmp_path):
    from deepseek_v4.metrics import read_metrics

    s = train.TrainSettings(**_PHASED)
    cache = {}
    stop = types.SimpleNamespace(signal=None)
    with _setup(tmp_path / "full", s, cache) as full:
        assert run_lib.train_loop(full, stop).step == 6
        final = _copy(full.state)
    phases = [r["phase"] for r in read_metrics(str(tmp_path / "full"))]
    assert phases == ["dense"] * 2 + ["warmup"] * 2 + ["sparse"] * 2

    # The same run stopped after step 3 (mid warm-up: the checkpoint holds one warm-up update), then resumed.
    with _setup(tmp_path / "resumed", s, cache) as first:
        assert _train_until(first, 3) == 3
        at_3 = _copy(first.state)
    assert int(train.main_optimizer_count(at_3)) == 2
    assert int(jax.tree.leaves(at_3.indexer_opt_state)[0]) == 1  # the warm-up optimizer's count
    with _setup(tmp_path / "resumed", s, cache) as second:
        assert second.resumed and second.start == 3
        restored = _copy(second.state)
        for field in ("params", "extras", "opt_state", "indexer_opt_state"):
            assert _same(getattr(at_3, field), getattr(restored, field)), field
        assert run_lib.train_loop(second, types.SimpleNamespace(signal=None)).step == 6
        resumed_final = _copy(second.state)
    assert _same(final, resumed_final)
    records = read_metrics(str(tmp_path / "resumed"))
    assert [r["phase"] for r in records] == ["dense"] * 2 + ["warmup"] * 2 + ["sparse"] * 2


def test_a_warmup_can_be_added_to_and_dropped_from_a_resumed_run(tmp_path):
    """A checkpoint without the warm-up's optimizer state resumes into a run with a warm-up (the state starts
    fresh, nothing is moved aside); a run without a warm-up resumed after one keeps that state, so the main
    optimizer's count still leaves the warm-up updates out."""
    cache = {}
    plain = train.TrainSettings(**{**_PHASED, "indexer_warmup_steps": 0})
    with _setup(tmp_path, plain, cache) as first:
        assert first.state.indexer_opt_state is None
        assert _train_until(first, 2) == 2  # two dense steps
    with _setup(tmp_path, train.TrainSettings(**_PHASED), cache) as second:
        assert second.resumed and second.start == 2
        assert int(jax.tree.leaves(second.state.indexer_opt_state)[0]) == 0  # fresh
        assert run_lib.train_loop(second, types.SimpleNamespace(signal=None)).step == 6
        assert int(train.main_optimizer_count(second.state)) == 4
    longer = train.TrainSettings(**{**_PHASED, "indexer_warmup_steps": 0, "steps": 8})
    with _setup(tmp_path, longer, cache) as third:
        assert third.resumed and third.start == 6
        assert int(jax.tree.leaves(third.state.indexer_opt_state)[0]) == 2
        assert int(train.main_optimizer_count(third.state)) == 4
        assert run_lib.train_loop(third, types.SimpleNamespace(signal=None)).step == 8
    assert not glob.glob(str(tmp_path / "checkpoints" / "*corrupt*"))


@pytest.mark.slow
def test_the_real_models_warmup_step_trains_only_its_indexers():
    from deepseek_v4 import DeepseekV4

    cfg = get_config("tiny", vocab_size=1024, num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1)
    s = train.TrainSettings(steps=4, warmup_steps=1, sparse_attention_after=2, indexer_warmup_steps=1)
    tx = train.make_optimizer(s)  # Muon + AdamW: the indexers' matrices are Muon's in the other phases
    graphdef, state = train.init_state(DeepseekV4(cfg, rngs=nnx.Rngs(0)), tx, 0, train.make_indexer_warmup_optimizer(s))
    batch = SyntheticIterator(2, 32, 0, cfg.vocab_size).__next__()
    before = _copy(state)
    new, m = train.make_train_step(graphdef, cfg, tx, s, phase=train.csa_phase(s, 1))(
        state, jax.tree.map(jnp.asarray, batch))
    after = _copy(new)
    assert bool(m["update_ok"]) and float(m["indexer_loss"]) > 0
    idx_before, rest_before = train.split_indexer(before.params)
    idx_after, rest_after = train.split_indexer(after.params)
    assert len(jax.tree.leaves(idx_before)) == 6  # wq_b, weights_proj, compressor wkv / wgate / ape / norm
    assert _same(rest_before, rest_after) and _same(before.opt_state, after.opt_state)
    assert _same(before.extras, after.extras)  # no router-bias update
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(idx_before), jax.tree.leaves(idx_after))]
    assert all(moved), moved
