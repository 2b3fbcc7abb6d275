"""Orbax checkpoints of a training run: train state + data-iterator state + config JSON, with safe fallback.

Layout of `<workdir>/checkpoints/<step>/` (one Orbax composite checkpoint per saved step):
  state/   the train-state pytree as nested dicts of arrays (OCDBT), restored straight into the target shardings
  data/    the data iterator's state, one JSON file per process (written from a snapshot taken at save time)
  config/  the resolved model `Config` as JSON
  meta/    JSON: step, train settings, and a fingerprint of the state (sums of squares) checked on restore

Saves are asynchronous: `save` returns once the arrays are copied off the step's buffers; Orbax writes into a
temporary directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoints intact. On restore, a checkpoint that fails to read, whose fingerprint does not match, or that
holds a non-finite value is moved aside (`<step>.corrupt-<time>`, nothing is deleted) with a warning, and
the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from grain import checkpoint as grain_checkpoint

from deepseek_v4.config import Config
from deepseek_v4.params import path_keys

log = logging.getLogger(__name__)

# Relative tolerance of the restore-time fingerprint check: a restore onto another mesh sums in another order.
_FINGERPRINT_RTOL = 1e-3
# Orbax splits the write of a replicated array across its replicas ("replica-parallel"), slicing each replica's part
# on the device: a dispatch per array and replica, and a small program per shape and sharding compiled at the first
# save (on an 8-device CPU mesh of a one-layer model: 1,491 slices, 4 of a run's 21 CPU-seconds). For arrays of less
# than 1 MiB per replica the split buys nothing measurable, so only larger ones are split (Orbax's own threshold;
# docs/checkpoints.md, Saving).
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _split_only_large_replicated_arrays() -> None:
    """Registers Orbax's jax.Array handler with `REPLICA_PARALLEL_MIN_BYTES` (process-wide; idempotent)."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_BYTES:
        return
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns on every override; this one is intended
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
            override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of a different model; the message names the fields that differ."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


# ---- pytree <-> nested dict --------------------------------------------------------------------------


def to_nested(tree: Any) -> dict[str, Any]:
    """A pytree as nested dicts keyed by its path entries (dict keys, attribute names, list indices), as
    `deepseek_v4.params.path_keys` names them: these are the names stored on disk."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = path_keys(path) or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested(nested: dict[str, Any], like: Any) -> Any:
    """Inverse of `to_nested`: the leaves of `nested` put back into the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for name in path_keys(path) or ["value"]:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---- fingerprint ----------------------------------------------------------------------------------------


@jax.jit
def _fingerprint(tree: Any) -> tuple[jax.Array, jax.Array]:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
    total = jnp.sum(jnp.stack(sq)) if sq else jnp.zeros((), jnp.float32)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    return total, finite


def fingerprint(tree: Any) -> tuple[float, bool]:
    """(sum of squares of every float leaf, all values finite) of a pytree of arrays."""
    total, finite = jax.device_get(_fingerprint(tree))
    return float(total), bool(finite)


# ---- data-iterator state ------------------------------------------------------------------------------


class _IteratorSnapshot:
    """The iterator state taken at save time, in the shape grain's Orbax handler expects (bytes of JSON).

    Taking the snapshot synchronously matters: an async save may run after the loop has advanced the iterator.
    """

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode())

    def start_prefetch(self) -> None:
        pass


# ---- the manager ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: Any
    data_state: Any
    meta: dict[str, Any]


# Config fields that change how the same model is computed, not what it is: a run may resume under other values
# (e.g. continue a bf16-trained model with FP4 QAT, or turn on rematerialisation to fit a longer sequence).
EXECUTION_FIELDS = ("dtype", "remat_policy", "quant", "moe_impl", "attention_impl")


def _diff_configs(saved: dict[str, Any], current: Config, *, execution: bool = False) -> list[str]:
    """Fields whose values differ: the architecture fields, or (`execution=True`) the execution fields.

    A field missing from the saved JSON (a checkpoint written before the field existed) counts as the field's
    default value, so adding a field to `Config` keeps old checkpoints resumable.
    """
    now = current.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    out = []
    for k in sorted(set(saved) | set(now)):
        if (k in EXECUTION_FIELDS) != execution:
            continue
        a = saved.get(k, defaults.get(k, "<absent>"))
        b = now.get(k, "<absent>")
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{k} (checkpoint {a}, now {b})")
    return out


class Checkpointer:
    """Saves and restores the train state of one run directory.

    Args:
      directory: where the step directories live (created if missing).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread (`wait` blocks until it is done).
      read_only: for programs that only read a run (evaluation, initialising another run from it): nothing in the
        directory is written, deleted or cleaned up, and no background deletion starts (a reader that exits at
        once must not leave a cleanup thread behind).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._keep = keep
        self._async = async_save and not read_only
        self._read_only = read_only
        self._manager = self._open()
        # A writer's manager starts removing the tmp directories of interrupted saves in a background thread and
        # awaits it only at its first save; a run that stops before saving (a one-line error) would exit with that
        # thread still running, and it fails at interpreter shutdown ("cannot schedule new futures"). Finish it
        # here. (Orbax 0.12 has no public call for this; the attribute check keeps other versions working.)
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def _open(self) -> ocp.CheckpointManager:
        _split_only_large_replicated_arrays()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if self._read_only else self._keep,  # a reader deletes nothing
            enable_async_checkpointing=self._async,
            create=not self._read_only,
            # a save killed half-way leaves a tmp dir; it was never a checkpoint (a reader leaves it to the run)
            cleanup_tmp_directories=not self._read_only,
        )
        return ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain_checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, config: Config, data_state: Any = None,
             meta: dict[str, Any] | None = None) -> None:
        """Start saving `state` (a pytree of arrays) at `step`; returns before the write finishes if async.

        Raises:
          ValueError: the state holds a NaN or inf (a non-finite state is never written).
        """
        total, finite = fingerprint(state)
        if not finite:
            raise ValueError(f"refusing to save step {step}: the train state holds NaN or inf values")
        meta = {"step": int(step), "fingerprint": total, "saved_at": time.time(), **(meta or {})}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_nested(state)),
                data=grain_checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
                config=ocp.args.JsonSave(config.to_dict()),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config JSON stored with `step`."""
        got = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(got["config"])

    def saved_meta(self, step: int) -> dict[str, Any]:
        """The meta JSON stored with `step` (settings, mesh, fingerprint, ...)."""
        got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(got["meta"])

    def check_config(self, config: Config) -> list[str]:
        """Raise `ConfigMismatchError` if the newest readable checkpoint was written for another model.

        Returns:
          The execution fields (`EXECUTION_FIELDS`) that differ from the checkpoint's, as "name (checkpoint a,
          now b)" strings: allowed, and worth telling the user.
        """
        for step in reversed(self.steps()):
            try:
                saved = self.saved_config(step)
            except Exception:  # an unreadable config: `restore` moves this checkpoint aside later
                continue
            diff = _diff_configs(saved, config)
            if diff:
                raise ConfigMismatchError(
                    f"{self.directory} holds checkpoints of a different model; mismatching config fields: "
                    + "; ".join(diff) + ". Use another --workdir or the same model flags.")
            return _diff_configs(saved, config, execution=True)
        return []

    def read(self, abstract_state: Any, step: int) -> Restored:
        """Restore exactly `step` (no fallback, nothing moved aside: for tools that only read a run).

        Raises:
          ValueError: no such step, or its state does not match its saved fingerprint.
        """
        if step not in self.steps():
            raise ValueError(f"no checkpoint step {step} in {self.directory} (steps: {self.steps()})")
        got = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(to_nested(jax.tree.map(_as_target, abstract_state))),
            meta=ocp.args.JsonRestore()))
        state, meta = from_nested(got["state"], abstract_state), dict(got["meta"])
        total, _ = fingerprint(state)
        if not np.isclose(total, float(meta["fingerprint"]), rtol=_FINGERPRINT_RTOL, atol=0.0):
            raise ValueError(f"checkpoint step {step} does not match its saved fingerprint")
        return Restored(step=step, state=state, data_state=None, meta=meta)

    def restore(self, abstract_state: Any, *, config: Config | None = None,
                optional: dict[str, Any] | None = None) -> Restored | None:
        """Restore the newest good checkpoint into `abstract_state`'s structure, shapes, dtypes and shardings.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) like the saved state.
          config: if given, a checkpoint of a different model raises `ConfigMismatchError`.
          optional: fields of `abstract_state` (a dataclass) that a checkpoint may or may not hold, each with
            its abstract value: restored into that value where the checkpoint holds the field, None where it
            does not (e.g. the indexer warm-up's optimizer state, saved only by runs with a warm-up).

        Returns:
          The restored step, state, data-iterator state and meta JSON; None if there is no checkpoint.

        Raises:
          ConfigMismatchError: see `config`.
          NoUsableCheckpointError: checkpoints exist but none restores.
        """
        if config is not None:
            self.check_config(config)
        tried = []
        while self.steps():
            step = self.steps()[-1]
            try:
                like = abstract_state
                if optional:
                    saved = set(self._manager.item_metadata(step)["state"].tree)
                    like = dataclasses.replace(like, **{k: v if k in saved else None for k, v in optional.items()})
                target = to_nested(jax.tree.map(_as_target, like))
                got = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=grain_checkpoint.CheckpointRestore(_IteratorSnapshot()),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                state = from_nested(got["state"], like)
                meta = dict(got["meta"])
                total, finite = fingerprint(state)
                if not finite:
                    raise ValueError("the restored state holds NaN or inf values")
                want = float(meta["fingerprint"])
                if not np.isclose(total, want, rtol=_FINGERPRINT_RTOL, atol=0.0):
                    raise ValueError(f"state fingerprint {total!r} does not match the saved {want!r}")
                return Restored(step=step, state=state, data_state=got["data"].state, meta=meta)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # any read failure means this checkpoint cannot be trusted
                reason = (str(e).splitlines() or [type(e).__name__])[0].split(" See full")[0][:300]
                aside = self._move_aside(step)
                log.warning("checkpoint step %d is unusable (%s); moved it to %s and falling back to an older one",
                            step, reason, aside)
                tried.append(step)
        if tried:
            raise NoUsableCheckpointError(
                f"no usable checkpoint in {self.directory}: steps {tried} failed to restore (moved aside)")
        return None

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt-{int(time.time())}"
        os.replace(src, dst)
        self._manager.close()
        self._manager = self._open()
        return dst


def _as_target(x: Any) -> jax.ShapeDtypeStruct:
    return x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
