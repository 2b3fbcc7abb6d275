"""2 processes x 4 CPU devices (gloo) give the same results as 1 process x 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

from sharding import mesh as mesh_lib
from tests.sharding import multiprocess_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(module_args: list[str], num_processes: int, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Run `python -m <module_args>` as `num_processes` processes on localhost; each gets its process flags."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, "-m", *module_args, f"--coordinator=localhost:{port}",
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


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "mp.npz")
    runs = launch(["tests.sharding.multiprocess_worker", "--local_devices=4", f"--out={out}"], 2)
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:]
    multi = dict(np.load(out))
    single = multiprocess_worker.compute(mesh_lib.make_mesh(multiprocess_worker.MESH))
    assert sorted(multi) == sorted(single)
    np.testing.assert_array_equal(multi["psum"], np.float32(sum(range(8))))
    assert int(multi["dropped"]) == 0
    for k in single:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-6, atol=1e-6, err_msg=k)
