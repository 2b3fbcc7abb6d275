"""2 processes x 4 CPU devices (gloo) give the same results as 1 process x 8 devices."""

import numpy as np

from sharding import mesh as mesh_lib
from tests.sharding import multiprocess_worker
from tests.sharding.launch import launch


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "mp.npz")
    runs = launch("tests.sharding.multiprocess_worker", ["--local_devices=4", f"--out={out}"], 2, 4,
                  coordinator_flag="coordinator")
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:]
    multi = dict(np.load(out))
    single = multiprocess_worker.compute(mesh_lib.make_mesh(multiprocess_worker.MESH))
    assert sorted(multi) == sorted(single)
    np.testing.assert_array_equal(multi["psum"], np.float32(sum(range(8))))
    assert int(multi["dropped"]) == 0
    for k in single:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-6, atol=1e-6, err_msg=k)
