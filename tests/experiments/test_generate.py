"""experiments.generate: loads imported official weights (a step-0 pretraining checkpoint) and the safetensors
themselves, streams a completion, never writes into the workdir, and fails in one line on bad input."""

import io
import os
import subprocess
import sys

import jax
import pytest

from experiments import generate
from tests.experiments import post_training
from tests.tools.test_export import _official_weights, _write_source
from tools import import_safetensors

# Two layers (CSA and HCA) and the MTP layer; the real vocabulary: prompts go through the real tokenizer.
CFG = post_training.CFG.replace(index_topk=16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _listing(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return _write_source(tmp_path_factory.mktemp("official"), CFG, _official_weights(CFG, seed=3))


@pytest.fixture(scope="module")
def run_dirs(official, tmp_path_factory):
    hf_dir = official
    workdir = str(tmp_path_factory.mktemp("run"))
    import_safetensors.import_run(hf_dir, workdir, preset="tiny", devices=jax.devices()[:1], optimizer="adamw",
                                  progress=False)
    return hf_dir, workdir


@pytest.mark.slow
def test_checkpoint_and_safetensors_generate_the_same_stream(run_dirs):
    hf_dir, workdir = run_dirs
    before = _listing(workdir)
    model, source = generate.load_checkpoint(workdir)
    assert source.endswith("step 0")
    out = io.StringIO()
    texts = generate.run(model, ["Hello"], "think-high", out=out, max_new_tokens=6, greedy=True)
    assert out.getvalue() == texts[0] + "\n" and texts[0]
    assert _listing(workdir) == before  # nothing written into the run directory
    same, _ = generate.load_safetensors(hf_dir, "tiny")
    assert generate.run(same, ["Hello"], "think-high", out=io.StringIO(), max_new_tokens=6, greedy=True) == texts
    many = generate.run(same, ["Hello", "A longer second prompt"], "raw", out=io.StringIO(), max_new_tokens=3,
                        greedy=True)
    assert len(many) == 2


def test_prompt_ids_modes():
    raw = generate.prompt_ids("Hi", "raw")
    assert raw[0] == 0 and len(raw) > 1
    assert generate.prompt_ids("Hi", "non-think") != generate.prompt_ids("Hi", "think-high")
    with pytest.raises(ValueError, match="unknown mode"):
        generate.prompt_ids("Hi", "think-low")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--mode=think-low"], "unknown mode"),
    (["--max_len=8", "--max_new_tokens=4"], "max_len is 8"),
    (["--step=7"], "no checkpoint for step 7"),
])
def test_one_line_errors(run_dirs, args, message):
    _, workdir = run_dirs
    cmd = [sys.executable, "-m", "experiments.generate", f"--workdir={workdir}", "--prompt=Hello there"] + args
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("generate: error:") and message in lines[-1], res.stderr


@pytest.mark.slow
def test_mismatched_checkpoint_is_one_error(official, tmp_path):
    hf_dir = official
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(hf_dir):
        os.symlink(os.path.join(hf_dir, name), bad / name)
    with pytest.raises(ValueError, match="does not match|missing|shape"):
        generate.load_safetensors(str(bad), "tiny", num_hidden_layers=1,
                                  compress_ratios=CFG.compress_ratios[:1] + CFG.compress_ratios[2:])
