"""One training run, shared by the entry points: settings -> `setup` -> `train_loop` -> close.

`setup` starts JAX (multi-process if asked), opens the checkpointer, builds the mesh, restores the newest good
checkpoint or creates a fresh state, opens the data source and the metrics writer, and returns a `Run`. The `Run`
owns what must be released (the Orbax checkpoint manager, waited for, and the metrics files): use it as a context
manager, so they are closed on every exit path, errors and `sys.exit` included. `train_loop` takes steps until
`steps`, a stop signal or too many non-finite steps, logging (the records and the progress line:
`experiments.reporting`) and saving as it goes.

Pretraining passes the packed-corpus data source and `train.make_train_step`; another phase (SFT, RL) passes its
own data source (batches may carry per-token `loss_weights`), step builder (e.g. `make_train_step` with another
`loss_fn`) and `initial_state` (pretrained weights) and reuses the rest; `train_and_report` ends every entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from deepseek_v4 import DeepseekV4, data, metrics, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import Config, setting
from deepseek_v4.recipes import Schedule
from experiments import preflight, reporting, spikes
from sharding import host_data
from sharding import mesh as mesh_lib
from sharding import rules


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a run is executed and recorded (not what it optimizes: that is `train.TrainSettings`).

    The fields are the entry points' flags (so messages name them as flags); the defaults are those of the CPU
    `nano` run.
    """

    workdir: str | None = setting(None, "Run directory (checkpoints, metrics). Default: runs/<config>.")
    batch_size: int = setting(8, "Global batch size in rows (sequences) per step.")
    seq_len: int = setting(128, "Tokens per row.")
    seed: int = setting(0, "Seed of the model init and the data order.")
    mesh: str = setting("", "Device mesh, e.g. data=2,expert=4 (default: data over all devices).")
    save_every: int = setting(50, "Steps between checkpoints (one is also written at the end).")
    keep_checkpoints: int = setting(3, "How many of the newest checkpoints to keep.")
    log_every: int = setting(5, "Steps between metric records.")
    max_bad_steps: int = setting(5, "Stop after this many consecutive steps with non-finite loss/gradients.")
    peak_flops: float | None = setting(None, "Peak FLOP/s per device for MFU (default: vendor table, measured on "
                                       "CPU).")
    data: str = setting("shakespeare", "'shakespeare' (the embedded corpus), 'synthetic' (a learnable token "
                        "pattern, no tokenizer), or comma-separated directories written by tools.prepare_data.")
    data_weights: tuple[float, ...] | None = setting(None, "Token share per --data directory (default: by size).")
    data_cache: str = setting("~/.cache/deepseek_v4_jax", "Where the embedded corpus is prepared.")
    data_workers: int = setting(0, "grain prefetch processes (0: in-process).")
    compilation_cache: str = setting("~/.cache/deepseek_v4_jax/xla", "Persistent XLA compilation cache directory "
                                     "('' disables).")
    plot: bool = setting(True, "At the end of the run, draw <workdir>/metrics.png (tools.plot_metrics).")
    tensorboard: bool = setting(True, "Also write TensorBoard event files to <workdir>/tensorboard.")
    progress: bool | None = setting(None, "Progress bar (default: when stderr is a terminal; else log lines).")
    coordinator_address: str | None = setting(None, "Multi-process: host:port of process 0.")
    num_processes: int | None = setting(None, "Multi-process: number of processes.")
    process_id: int | None = setting(None, "Multi-process: this process's index.")
    distributed_auto: bool = setting(False, "Multi-process: read the cluster from the environment (TPU, SLURM, "
                                     "...).")
    debug_nan_at_steps: tuple[int, ...] = setting((), "Testing only: make the loss NaN at these steps (their "
                                                  "batches carry NaN loss weights).")

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "save_every", "keep_checkpoints", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"--peak_flops must be positive, got {self.peak_flops}")

    def check_with(self, s: train.TrainSettings) -> None:
        """Raise a one-line ValueError if these settings cannot run `s`."""
        if self.batch_size % s.grad_accum:
            raise ValueError(f"--batch_size ({self.batch_size}) must be divisible by --grad_accum ({s.grad_accum})")


class UserError(Exception):
    """A mistake in the settings or the run directory: the entry point prints it as one line and exits 2."""


@contextlib.contextmanager
def _as_user_error(*kinds: type[BaseException]):
    try:
        yield
    except kinds as e:
        raise UserError(str(e)) from None


class StopSignal:
    """SIGTERM / SIGINT handler: the loop finishes its step, saves and exits; a second signal aborts."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, saving, exiting",
              file=sys.stderr, flush=True)


# A data source: (part, parts) -> an iterator of this process's host batches with get_state() / set_state()
# (`Run.row_group`: the process index and count unless context or tensor spans processes) (the state is checkpointed with the model). A run with a recipe calls it with
# `opts=` the stage's RunSettings (its seq_len and batch_size).
DataSource = Callable[..., Iterator[dict[str, np.ndarray]]]
# A step builder with `train.make_train_step`'s signature.
StepBuilder = Callable[..., Callable[[train.TrainState, dict[str, jax.Array]], tuple[train.TrainState, dict]]]


@dataclasses.dataclass
class Run:
    """Everything a training loop needs; made by `setup`. A context manager: leaving it closes the checkpointer
    (after its saves finish) and the metrics writer."""

    cfg: Config
    settings: train.TrainSettings
    opts: RunSettings
    workdir: str
    mesh: jax.sharding.Mesh
    plan: train.StatePlan
    state: train.TrainState
    start: int  # the step the state is at
    resumed: bool
    checkpointer: ckpt_lib.Checkpointer
    primary: bool  # process 0: prints, writes metrics
    make_step: StepBuilder
    resources: contextlib.ExitStack
    data: Iterator[dict[str, np.ndarray]] | None = None  # None when the run is already complete
    writer: metrics.MetricsWriter | None = None
    peak_flops: float = 0.0
    last_saved: int | None = None
    evaluator: Any = None  # a deepseek_v4.evaluation.Evaluator: held-out metrics join the records at its steps
    spike_settings: Any = None  # experiments.spikes.SpikeSettings (None: no spike detection)
    schedule: Schedule | None = None  # the resolved recipe: stages change seq_len, batch and attention by step
    data_source: DataSource | None = None
    data_stage: int | None = None  # the stage the open data iterator reads for
    unfit: dict[int, str] = dataclasses.field(default_factory=dict)  # stage -> why its memory plan does not fit
    _steps: dict[tuple[int, str], Callable] = dataclasses.field(default_factory=dict)  # by (stage, CSA phase)
    record_extras: Callable[[int], dict[str, Any]] | None = None  # host metrics joined to the record at a step
    progress_keys: tuple[str, ...] = ()  # record keys the progress line shows too

    @property
    def complete(self) -> bool:
        return self.start >= self.settings.steps

    @functools.cached_property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return rules.named_sharding(("batch", "seq"), self.mesh, "activation")

    @functools.cached_property
    def row_group(self) -> tuple[int, int]:
        """(index, count): the part of the global batch this process loads (`host_data.row_group`: processes
        sharing rows through `context` or `tensor` load the same part); without a mesh, one part per process."""
        if self.mesh is None:
            return jax.process_index(), jax.process_count()
        group = host_data.row_group(self.batch_sharding)
        return group.index, group.count

    def _step_key(self, step: int) -> tuple[int, str]:
        stage = self.schedule.stage_at(step).index if self.schedule else 0
        return stage, train.csa_phase(self.settings, step)

    def compiles(self, step: int) -> bool:
        """Whether calling the step function for `step` compiles it (the first step of each CSA phase and
        recipe stage)."""
        return self._step_key(step) not in self._steps

    def step_fn(self, step: int) -> Callable:
        """The jitted step for `step`, one per recipe stage and CSA phase (`train.csa_phase`: dense, indexer
        warm-up, sparse)."""
        key = self._step_key(step)
        if key not in self._steps:
            s = self.settings
            if self.schedule and self.schedule.stages[key[0]].grad_accum != s.grad_accum:
                s = dataclasses.replace(s, grad_accum=self.schedule.stages[key[0]].grad_accum)
            self._steps[key] = self.make_step(self.plan.graphdef, self.cfg, self.plan.tx, s, phase=key[1])
        return self._steps[key]

    def open_data(self, step: int, saved_state: Any = None) -> None:
        """Open the data iterator for `step` (its recipe stage) and continue from `saved_state` when that was saved
        in the same stage."""
        if self.schedule is None:
            self.data = self.data_source(*self.row_group)
            if saved_state is not None:
                self.data.set_state(saved_state)
            return
        stage = self.schedule.stage_at(step)
        # crossing a boundary: the position reached in the previous stage
        before = self.data_state() if self.data is not None else saved_state
        self.opts = preflight.stage_opts(self.opts, stage)
        self.data = self.data_source(*self.row_group, opts=self.opts)
        self.data_stage = stage.index
        if before is not None and before.get("recipe_stage") == stage.index:
            self.data.set_state(before)  # resuming inside the stage
        elif before is not None and data.carry_position(before, self.data) is not None:
            self.data.set_state(data.carry_position(before, self.data))  # same rows, another batch size
        if self.primary and step > 0 and saved_state is None:
            print(f"step {step}: stage {stage.name!r}: seq_len {stage.seq_len}, {stage.batch_size} sequences per "
                  f"step, {stage.attention} attention", flush=True)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """The host batch of `step`; crossing into a new recipe stage rebuilds the data iterator first."""
        if self.schedule is not None and self.schedule.stage_at(step).index != self.data_stage:
            if self.schedule.stage_at(step).index in self.unfit:
                if self.last_saved != step:
                    self.save(step)
                raise UserError(f"{self.unfit[self.schedule.stage_at(step).index]} (stopped and saved at step {step})")
            self.open_data(step)
        return next(self.data)

    def data_state(self) -> Any:
        """The data iterator's state as checkpointed (tagged with its recipe stage when there is a recipe)."""
        if self.schedule is None:
            return self.data.get_state()
        return {**self.data.get_state(), "recipe_stage": self.data_stage}

    def save(self, step: int) -> None:
        meta = {"settings": self.settings.to_dict(), "mesh": dict(self.mesh.shape)}
        if self.schedule is not None:
            meta["recipe"] = self.schedule.to_dict()
        self.checkpointer.save(step, self.state, config=self.cfg, data_state=self.data_state(), meta=meta)
        self.last_saved = step

    def close(self) -> None:
        self.resources.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def setup(cfg: Config, settings: train.TrainSettings, opts: RunSettings, *, workdir: str, model_name: str,
          data_source: DataSource, make_step: StepBuilder = train.make_train_step,
          build_model: Callable[[], nnx.Module] | None = None,
          initial_state: Callable[[train.StatePlan], train.TrainState] | None = None,
          schedule: Schedule | None = None) -> Run:
    """Start JAX, open the run directory, restore or create the state, open the data and the metrics writer.

    Args:
      workdir: the run directory (checkpoints/, metrics.jsonl, tensorboard/, config.json).
      model_name: how the model is named in the log (the preset).
      data_source: makes this process's batch iterator (not called when the run is already complete).
      make_step: builds the jitted step (`train.make_train_step`'s signature).
      build_model: constructs the model (default: `DeepseekV4(cfg)` seeded with `opts.seed`).
      initial_state: makes the state of a run that has no checkpoint yet, laid out by the plan (default: a new
        model from `build_model`); a post-training phase passes one that loads pretrained weights.
      schedule: a resolved recipe (`deepseek_v4.recipes`): the run crosses its stages by itself.

    Raises:
      UserError: bad settings, a run directory of another model, no usable checkpoint, data that cannot resume.
        Whatever was opened before is closed.
    """
    with _as_user_error(ValueError):
        opts.check_with(settings)
        train.check_settings_for_config(settings, cfg)
        mesh_lib.init_distributed(opts.coordinator_address, opts.num_processes, opts.process_id,
                                  auto=opts.distributed_auto)
    if opts.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(opts.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if build_model is None:
        def build_model():
            return DeepseekV4(cfg, rngs=nnx.Rngs(opts.seed))

    with contextlib.ExitStack() as resources:
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=opts.keep_checkpoints)
        resources.callback(ckpt.close)
        with _as_user_error(ValueError):
            changed = ckpt.check_config(cfg)
            mesh = mesh_lib.make_mesh(opts.mesh or None)
            if schedule is None:  # a recipe's stages are checked one by one (preflight.check_memory)
                _check_batch_layout(opts, settings, mesh)
        primary = jax.process_index() == 0
        if primary:
            os.makedirs(workdir, exist_ok=True)
            _write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
        with jax.set_mesh(mesh):
            plan = train.plan_state(build_model, settings, mesh)
            with _as_user_error(ValueError):  # before anything is allocated or compiled
                schedule, unfit = preflight.check_memory(cfg, settings, opts, mesh, plan, schedule)
            if schedule is not None and schedule.stage_at(ckpt.latest_step() or 0).index in unfit:
                raise UserError(unfit[schedule.stage_at(ckpt.latest_step() or 0).index])
            with _as_user_error(ckpt_lib.ConfigMismatchError, ckpt_lib.NoUsableCheckpointError):
                restored = ckpt.restore(plan.target, config=cfg,
                                        optional={"indexer_opt_state": plan.indexer_opt_target})
            if restored is None and initial_state is not None:
                with _as_user_error(ValueError, ckpt_lib.ConfigMismatchError, ckpt_lib.NoUsableCheckpointError):
                    state = train.with_indexer_warmup_state(initial_state(plan), plan)
            elif restored is None:
                _, state = train.create_state(build_model, plan.tx, opts.seed, plan.shardings, graphdef=plan.graphdef,
                                              indexer_tx=plan.indexer_tx)
            else:
                state = train.with_indexer_warmup_state(restored.state, plan)
        run = Run(cfg=cfg, settings=settings, opts=opts, workdir=workdir, mesh=mesh, plan=plan, state=state,
                  start=restored.step if restored else 0, resumed=restored is not None, checkpointer=ckpt,
                  primary=primary, make_step=make_step, resources=resources,
                  last_saved=restored.step if restored else None, schedule=schedule, data_source=data_source,
                  unfit=unfit)
        if primary:
            print(mesh_lib.describe(mesh), flush=True)
            print(rules.summary(plan.abstract.params, mesh), flush=True)
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(plan.abstract.params))
            print(f"model {model_name}: {n_params:,} parameters; workdir {workdir}", flush=True)
            if schedule is not None:
                print(schedule.table(), flush=True)
                for index in sorted(unfit):
                    print(f"warning: the run will save and stop at step {schedule.stages[index].first_step}: "
                          f"{unfit[index]}", flush=True)
        if not run.complete:
            with _as_user_error(ValueError):
                run.open_data(run.start, restored.data_state if restored is not None else None)
            if primary:
                fresh = "starting from the given weights" if initial_state is not None else "starting from scratch"
                print(f"resuming from step {run.start}" if run.resumed else fresh, flush=True)
                if run.resumed and changed:
                    print("resuming under other execution settings: " + "; ".join(changed), flush=True)
                run.writer = metrics.MetricsWriter(workdir, resume_step=run.start if run.resumed else None,
                                                   tensorboard=opts.tensorboard)
                resources.callback(run.writer.close)
            run.peak_flops, source = ((opts.peak_flops, "--peak_flops") if opts.peak_flops is not None
                                      else metrics.default_peak_flops())
            if primary:
                print(f"MFU against {run.peak_flops / 1e12:.3g} TFLOP/s per device ({source}), {mesh.size} "
                      "device(s)", flush=True)
        run.resources = resources.pop_all()  # from here on the Run closes them
    return run


def _check_batch_layout(opts: RunSettings, s: train.TrainSettings, mesh: jax.sharding.Mesh) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    micro = opts.batch_size // s.grad_accum
    if micro % dp:
        raise ValueError(f"the microbatch (batch_size / grad_accum = {micro}) must be divisible by the "
                         f"data-parallel mesh size ({dp})")
    host_data.check_batch(opts.batch_size, host_data.row_group(rules.named_sharding(("batch", "seq"), mesh)))


# ---- the loop -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """How `train_loop` ended."""

    step: int  # steps taken in total
    bad_streak: int  # consecutive skipped (non-finite) steps at the end
    failed: bool  # stopped by --max_bad_steps (nothing saved after the last good checkpoint)
    stopped_by: int | None  # the signal that stopped it, if any


def with_nan_loss_weights(batch: dict[str, np.ndarray], poisoned: bool) -> dict[str, np.ndarray]:
    """The batch with `loss_weights` (its own, or ones) multiplied by NaN if `poisoned`: its step's loss is NaN.

    Every batch of a run with --debug_nan_at_steps goes through here, so all of them carry the field and the step
    compiles once.
    """
    weights = batch.get("loss_weights", np.ones(batch["tokens"].shape, np.float32))
    return {**batch, "loss_weights": weights * np.float32(np.nan if poisoned else 1.0)}


class _BadSteps:
    """Counts consecutive skipped updates and reports each one."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0

    def check(self, step: int, m: dict[str, Any]) -> bool:
        """Look at a finished step's metrics; True once `limit` skipped steps happened in a row."""
        fine = bool(m["update_ok"]) or bool(m.get("loss_spike", False))  # a spike is reported by the spike guard
        self.streak = 0 if fine else self.streak + 1
        if self.streak:
            print(f"step {step}: non-finite loss or gradients, update skipped ({self.streak} in a row)",
                  file=sys.stderr, flush=True)
        return self.streak >= self.limit


def train_loop(run: Run, stop: StopSignal) -> Outcome:
    """Take steps from `run.start` to `run.settings.steps`; log every `log_every`, save every `save_every` and at
    the end. A stop signal ends it after the current step (saved). A non-finite step changes nothing and is
    counted; `max_bad_steps` in a row end it without saving. A step's `update_ok` is read one step late, so the
    host never waits for the device (except at a record or a save)."""
    opts, steps = run.opts, run.settings.steps
    nan_steps = set(opts.debug_nan_at_steps)
    guard = spikes.SpikeGuard(run.spike_settings or spikes.SpikeSettings(), batches_read=run.start)
    bad, window = _BadSteps(opts.max_bad_steps), reporting.StepWindow()
    progress = reporting.Progress(run.start, steps, run.primary, opts.progress, run.progress_keys)
    step, failed = run.start, False
    pending = None  # (step, metrics) of the last step whose `update_ok` has not been looked at yet
    try:
        with jax.set_mesh(run.mesh):
            while step < steps:
                host = guard.take(run.next_batch(step), step + 1)
                if nan_steps:
                    host = with_nan_loss_weights(host, step + 1 in nan_steps)
                batch = data.to_global(host, run.batch_sharding)
                compiles = run.compiles(step)
                limit = guard.limit()  # None without spike detection: the step's plain signature
                run.state, m = run.step_fn(step)(run.state, batch, *(() if limit is None else (limit,)))
                step += 1
                window.add(m, compiled_now=compiles)
                if pending is not None and bad.check(*pending):  # done by now: no pipeline stall
                    failed = True
                    break
                if pending is not None and guard.observe(*pending):
                    back = spikes.respond(run, guard, pending[0])
                    if back is not None:
                        step, pending = back, None
                        window.reset()
                        continue
                pending = (step, m)
                eval_now = run.evaluator is not None and run.evaluator.settings.due(step, steps)
                log_now = step % opts.log_every == 0 or step == steps or eval_now
                save_now = step % opts.save_every == 0 or step == steps or stop.signal is not None
                if log_now or save_now:
                    pending = None
                    if bad.check(step, m):
                        failed = True
                        break
                    if guard.observe(step, m):  # checked before a save: no checkpoint holds a spike's aftermath
                        back = spikes.respond(run, guard, step)
                        if back is not None:
                            step = back
                            window.reset()
                            continue
                if log_now:
                    held_out = {}
                    if eval_now:  # the same held-out batches every time; the training data is not touched
                        t_eval = time.perf_counter()
                        held_out = run.evaluator(run.state, sparse=train.sparse_at(run.settings, step - 1))
                        held_out["eval_seconds"] = time.perf_counter() - t_eval
                        window.exclude(held_out["eval_seconds"])
                    rec = {**reporting.summarise(run, window, step), **guard.record(), **held_out,
                           **(run.record_extras(step) if run.record_extras else {})}
                    if run.writer:
                        run.writer.write(step, rec)
                    progress.log(step, rec)
                    window.reset()
                progress.advance(step)
                if save_now:
                    t_save = time.perf_counter()
                    run.save(step)
                    guard.saved(step)
                    window.exclude(time.perf_counter() - t_save)  # the blocking part of a save is not step time
                if stop.signal is not None:
                    break
            if not failed and stop.signal is not None and run.last_saved != step:
                run.save(step)
    finally:
        progress.close()
    return Outcome(step=step, bad_streak=bad.streak, failed=failed, stopped_by=stop.signal)


def train_and_report(run: Run, stop: StopSignal, prepare: Callable[[Run], None] | None = None) -> int:
    """The end of every entry point: train `run` (closed on every exit path), print how it ended, draw the curves.

    `prepare(run)`, if given, runs once the run is known to be incomplete (e.g. attaching the held-out
    evaluator); a ValueError from it is a one-line error.

    Returns the exit status: 0 (done, already complete, or stopped by a signal and saved), 1 (--max_bad_steps
    consecutive non-finite steps), 2 (`prepare` refused, or a recipe stage that does not fit was reached: saved
    and stopped).
    """
    with run:  # closes the checkpointer (its saves finished) and the metrics writer on every exit path
        if run.complete:
            print(f"the run in {run.workdir} is complete at step {run.start} (--steps={run.settings.steps}); "
                  "raise --steps to continue", flush=True)
            return 0
        if prepare is not None:
            try:
                prepare(run)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 2
        try:
            outcome = train_loop(run, stop)
        except UserError as e:  # a recipe stage that does not fit (saved before)
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    if outcome.failed:
        print(f"error: stopping: {outcome.bad_streak} consecutive steps had a non-finite loss or gradients (last: "
              f"step {outcome.step}); the newest checkpoint is step {run.checkpointer.latest_step()}",
              file=sys.stderr, flush=True)
        return 1
    if run.primary:
        why = f"stopped by {signal.Signals(outcome.stopped_by).name}" if outcome.stopped_by is not None else "done"
        print(f"{why} at step {outcome.step}; checkpoint {run.checkpointer.latest_step()} in {run.workdir}",
              flush=True)
        if run.opts.plot and outcome.stopped_by is None:
            reporting.plot_curves(run.workdir)
    return 0
