"""Start N copies of a `python -m` program on localhost as one multi-process JAX job (CPU devices, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import CODEGEN_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], num_processes: int, local_devices: int, *, coordinator_flag: str,
           timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Run `python -m module args --<coordinator_flag>=localhost:PORT --num_processes=N --process_id=i` N times.

    Each process sees `local_devices` CPU devices. Returns the completed processes (stdout and stderr merged).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices} {CODEGEN_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
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


def run_single(module: str, args: list[str], devices: int, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m module args` as one process with `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {CODEGEN_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
