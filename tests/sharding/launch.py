"""Start a `python -m` program as a test's subprocess: one process, or N copies on localhost as one multi-process
JAX job (CPU devices, gloo); and the environment such a subprocess gets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax

from tests.conftest import CODEGEN_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_env(devices: int | None = None, *, compilation_cache: bool = False) -> dict[str, str]:
    """This environment for a `python -m` subprocess on CPU: `devices` fake CPU devices (None: JAX's one), the
    session's codegen flags (tests.conftest), this checkout first on the path.

    With `compilation_cache`, the subprocess also uses the test session's persistent compilation cache (its
    directory and thresholds, read from this process's JAX config) through JAX's environment variables, so a warm
    suite does not recompile what a program compiled before. Without it, a `JAX_COMPILATION_CACHE_DIR` of the
    session's environment is removed: the subprocess compiles everything.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
    env["XLA_FLAGS"] = (CODEGEN_FLAGS if devices is None
                        else f"--xla_force_host_platform_device_count={devices} {CODEGEN_FLAGS}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if compilation_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(jax.config.jax_persistent_cache_min_compile_time_secs)
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = str(jax.config.jax_persistent_cache_min_entry_size_bytes)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], num_processes: int, local_devices: int, *, coordinator_flag: str,
           timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Run `python -m module args --<coordinator_flag>=localhost:PORT --num_processes=N --process_id=i` N times.

    Each process sees `local_devices` CPU devices and compiles its own programs, without the persistent compilation
    cache: JAX writes a multi-process job's executables from process 0 only, and on CPU a program's cache key
    differs between the processes (it hashes the devices' topology, whose fingerprint each CPU process computes
    differently), so process 1 never finds process 0's entries: the cache would not shorten the job, and its
    processes would run differently built executables. For the same reason `jax_share_binary_between_hosts`
    (process 0 compiles and sends the executable under its cache key) leaves process 1 waiting. Returns the
    completed processes (stdout and stderr merged).
    """
    port = free_port()
    env = subprocess_env(local_devices)
    procs = [
        subprocess.Popen([sys.executable, "-m", module, *args, f"--{coordinator_flag}=localhost:{port}",
                          f"--num_processes={num_processes}", f"--process_id={i}"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)
    ]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def run_single(module: str, args: list[str], devices: int | None = None, timeout: float = 900, *,
               compilation_cache: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args` as one process with `devices` CPU devices (stdout and stderr merged), with the
    test session's persistent compilation cache if `compilation_cache` (see `subprocess_env`)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=subprocess_env(devices, compilation_cache=compilation_cache), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
