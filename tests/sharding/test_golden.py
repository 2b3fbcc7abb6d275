"""The startup sharding summary of the `tiny` preset, pinned by a golden file.

Regenerate after an intended layout change with `UPDATE_GOLDEN=1 pytest tests/sharding/test_golden.py` and
review the diff: every changed line is a parameter whose layout (and so its collectives) changed.
"""

import os

from flax import nnx

from deepseek_v4 import DeepseekV4, get_config
from sharding import mesh as mesh_lib
from sharding import rules

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_fsdp2_expert2_tensor2.txt")


def test_tiny_summary_matches_golden():
    mesh = mesh_lib.make_mesh("fsdp=2,expert=2,tensor=2")
    abstract = nnx.eval_shape(lambda: DeepseekV4(get_config("tiny"), rngs=nnx.Rngs(0)))
    text = rules.summary(abstract, mesh) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        tmp = GOLDEN + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, GOLDEN)
    with open(GOLDEN, encoding="utf-8") as f:
        want = f.read()
    assert text == want, "sharding summary changed; see the module docstring to regenerate"
