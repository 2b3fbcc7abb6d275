"""The shared shape of a training entry point's `main` (experiments.pretrain, sft, grpo, distill and new ones).

An entry point defines its flags (`experiments.flags`), reads them in one place, sets up a `run.Run` and trains it.
Each step of that has the same rules everywhere, and this module holds them:

- `start(argv)`: positional arguments are a mistake; absl logs warnings only unless --verbosity is given (Orbax
  logs every save at INFO); Python's garbage collector is tuned for tracing (`tune_gc`).
- `user_errors()`: a ValueError raised while reading the flags (or checking data) is the user's mistake: one line
  `error: <message>` on stderr, exit status 2 (`fail`).
- `workdir(opts, model_name)`: --workdir, or runs/<model name>, as an absolute path.
- `train(setup, prepare)`: installs the SIGTERM / SIGINT handler before anything is built, calls `setup()` (a
  `run.UserError` from it is a one-line error, exit 2), then trains with `run.train_and_report` and exits with its
  status (0 done or stopped and saved, 1 too many non-finite steps, 2 a refused `prepare` or recipe stage).

A new entry point's `main` reads:

    def main(argv: list[str]) -> None:
        entry.start(argv)
        with entry.user_errors():  # the only place flags are read
            cfg = flag_gen.config_from_flags()
            settings = flag_gen.settings_from_flags(train.TrainSettings)
            opts = flag_gen.settings_from_flags(run_lib.RunSettings)
        workdir = entry.workdir(opts, "my_model")
        entry.train(lambda: run_lib.setup(cfg, settings, opts, workdir=workdir, model_name="my_model",
                                          data_source=my_data(opts)))
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from absl import flags
from absl import logging as absl_logging

from experiments import run as run_lib


def fail(msg: str) -> NoReturn:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# Python's cyclic garbage collector runs a young-generation pass every 700 net allocations (its default). Tracing and
# lowering a train step allocates millions of short-lived objects: with a pass every 10,000 instead, tracing and
# lowering a sharded tiny train step take 2.5 CPU-s instead of 3.3-3.7 (experiments/LOG.md#test-time-7).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Fewer young-generation collections (GC_YOUNG_THRESHOLD); the older generations keep their defaults."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def start(argv: list[str]) -> None:
    """The first line of `main`: refuse positional arguments; absl at WARNING unless --verbosity is given; `tune_gc`."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    tune_gc()
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around reading the flags: a ValueError inside ends the program as `fail(str(error))`."""
    try:
        yield
    except ValueError as e:
        fail(str(e))


def workdir(opts: run_lib.RunSettings, model_name: str) -> str:
    """The run directory: --workdir, or runs/<model_name> under the current directory; absolute, ~ expanded."""
    return os.path.abspath(os.path.expanduser(opts.workdir or os.path.join("runs", model_name)))


def train(setup: Callable[[], run_lib.Run], prepare: Callable[[run_lib.Run], None] | None = None) -> NoReturn:
    """Set up the run and train it; exits with `run.train_and_report`'s status.

    From the first line on, SIGTERM / SIGINT mean: take (at least) one step, save, exit 0. `setup()` builds the
    `run.Run` (a `run.UserError` from it is a one-line error, exit 2); `prepare(run)` is passed on to
    `run.train_and_report` (it runs once the run is known to be incomplete).
    """
    stop = run_lib.StopSignal()
    try:
        run = setup()
    except run_lib.UserError as e:
        fail(str(e))
    sys.exit(run_lib.train_and_report(run, stop, prepare=prepare))
