"""Export to and import from the official DeepSeek-V4 safetensors layout (tools.export_safetensors,
tools.import_safetensors, deepseek_v4.export): round trips in every format, the storage class of every tensor,
the checkpoint that experiments.pretrain resumes from, and transformers loading the bf16 export."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from deepseek_v4 import DeepseekV4, export, get_config, interop, quant, safetensors_files, tokenizer, train
from deepseek_v4 import checkpoint as ckpt_lib
from sharding import mesh as mesh_lib
from sharding import rules
from tests.conftest import TOLERANCES
from tools import export_safetensors, import_safetensors

# The tiny layer pattern (sliding, CSA, HCA, hash and learned routing, MTP) with a small vocabulary so the files
# stay small; index_topk covers every compressed entry of SEQ tokens, so no near-tie top-k selection can differ.
CFG = get_config("tiny", vocab_size=1024, index_topk=16)
MESH = "data=2,expert=4"  # the sharded load check
# The checkpoint round trips run on one device: Orbax compiles a slicing program per replicated array shape when
# it saves arrays replicated over several devices, which costs far more CPU time here than the whole import.
ONE_DEVICE = jax.devices()[:1]
SEQ = 45
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _official_weights(cfg, seed: int) -> dict[str, np.ndarray]:
    """A random model in the official layout, drawn like an initialised model perturbed by 0.1 N(0, 1) (so that
    zero-initialised tensors take part); BF16-class tensors are bfloat16, so they are exactly representable."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in export.plan(cfg, "bf16"):
        if p.storage == "i64":  # K distinct experts per token
            pick = np.argsort(rng.random((p.shape[0], cfg.n_routed_experts)), axis=1)[:, : p.shape[1]]
            out[p.name] = pick.astype(np.int64)
            continue
        x = 0.1 * rng.standard_normal(p.shape, dtype=np.float32)
        if p.name.endswith("norm.weight"):
            x += 1.0
        out[p.name] = x.astype(ml_dtypes.bfloat16) if p.storage == "bf16" else x
    return out


def _write_source(path, cfg, weights) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(export.hf_config(cfg, "bf16"), f)
    safetensors.numpy.save_file(weights, os.path.join(path, "model.safetensors"))  # an independent writer
    return str(path)


def _read_dir(path) -> dict[str, np.ndarray]:
    quant.patch_numpy_fp8_dtypes()
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(safetensors.numpy.load_file(os.path.join(path, name)))
    return out


@functools.cache
def _abstract_train_state(optimizer="adamw"):
    """The abstract train state experiments.pretrain builds (the same calls; its structure is mesh-independent)."""
    mesh = mesh_lib.make_mesh(None, ONE_DEVICE)
    with jax.set_mesh(mesh):
        def build():
            return DeepseekV4(CFG, rngs=nnx.Rngs(0))

        abstract_params = nnx.state(nnx.eval_shape(build), nnx.Param)
        specs = jax.tree.map(lambda s: s.spec, rules.param_shardings(abstract_params, mesh))
        tx = train.make_optimizer(train.TrainSettings(optimizer=optimizer), mesh=mesh, partition_specs=specs)
        return train.abstract_state(build, tx, 0)[1]


def _pretrain_target(mesh):
    """(abstract state, shardings) of pretrain's restore target on `mesh`."""
    abstract = _abstract_train_state()
    return abstract, train.state_shardings(abstract, mesh)


def _json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _restore(workdir):
    """Restore `workdir` the way experiments.pretrain does."""
    mesh = mesh_lib.make_mesh(None, ONE_DEVICE)
    abstract, shardings = _pretrain_target(mesh)
    with jax.set_mesh(mesh):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        try:
            return ckpt.restore(target, config=CFG)
        finally:
            ckpt.close()


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(str(k) for k in path): np.asarray(v.value) for path, v in nnx.to_flat_state(state)}


def _reference(weights: dict[str, np.ndarray]) -> DeepseekV4:
    """Our model from official-layout arrays through the interop table (the oracle for every round trip)."""
    return interop.from_hf(interop.config_to_hf(CFG), {k: np.asarray(v, np.float32) if v.dtype == ml_dtypes.bfloat16
                                                       else v for k, v in weights.items()})


def _qdq(x: np.ndarray, storage: str) -> np.ndarray:
    """Our own quantise-dequantise of one official tensor stored as `storage`."""
    x = np.asarray(x, np.float32)
    if storage == "fp8":
        return quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(x))
    if storage == "fp4":
        return quant.dequantize_mxfp4(*quant.quantize_mxfp4(x, axis=-1), axis=-1)
    return x


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    weights = _official_weights(CFG, seed=1)
    return weights, _write_source(tmp_path_factory.mktemp("source"), CFG, weights)


@pytest.fixture(scope="module")
def reference(source):
    return _reference(source[0])


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
    """A step-0 train-state checkpoint written by the importer (through deepseek_v4/checkpoint.py)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = import_safetensors.import_run(source[1], workdir, preset="tiny", devices=ONE_DEVICE,
                                            optimizer="adamw", progress=False)
    return workdir, summary


@pytest.fixture(scope="module")
def exports(imported, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_safetensors.export_run(imported[0], str(root / fmt), fmt, max_shard_bytes=400_000,
                                               read_bytes=64 << 10, progress=False) | {"dir": str(root / fmt)}
            for fmt in export.FORMATS}


def test_storage_classes_follow_the_release_table():
    """Which tensor is FP8 / MXFP4 / BF16 / FP32 / I64 in the fp4 (instruct) layout (docs/checkpoints.md)."""
    storage = {p.name: p.storage for p in export.plan(CFG, "fp4")}
    want = {
        "embed.weight": "bf16", "head.weight": "bf16", "norm.weight": "bf16", "hc_head_fn": "f32",
        "layers.0.ffn.gate.tid2eid": "i64", "layers.0.ffn.gate.weight": "bf16", "layers.0.attn.wq_a.weight": "fp8",
        "layers.0.attn.wq_b.weight": "fp8", "layers.0.attn.wkv.weight": "fp8", "layers.0.attn.wo_a.weight": "fp8",
        "layers.0.attn.wo_b.weight": "fp8", "layers.0.attn.attn_sink": "f32", "layers.0.attn.q_norm.weight": "bf16",
        "layers.0.hc_attn_fn": "f32", "layers.0.hc_ffn_base": "f32", "layers.0.hc_ffn_scale": "f32",
        "layers.0.ffn.shared_experts.w2.weight": "fp8", "layers.0.ffn.experts.7.w2.weight": "fp4",
        "layers.1.attn.compressor.wkv.weight": "bf16", "layers.1.attn.compressor.wgate.weight": "bf16",
        "layers.1.attn.compressor.ape": "f32", "layers.1.attn.compressor.norm.weight": "bf16",
        "layers.1.attn.indexer.wq_b.weight": "fp8", "layers.1.attn.indexer.weights_proj.weight": "bf16",
        "layers.1.attn.indexer.compressor.wkv.weight": "bf16", "layers.1.attn.indexer.compressor.ape": "f32",
        "layers.2.ffn.gate.bias": "f32", "mtp.0.e_proj.weight": "fp8", "mtp.0.hnorm.weight": "bf16",
    }
    assert {k: storage[k] for k in want} == want
    assert {p.storage for p in export.plan(CFG, "bf16")} == {"bf16", "f32", "i64"}
    assert {p.storage for p in export.plan(CFG, "fp8") if ".experts." in p.name} == {"fp8"}


def test_reads_are_bounded_blocks(imported):
    """The exporter never reads more than max(read_bytes, one tensor) of the checkpoint at once."""
    _, cfg, reader = export.open_checkpoint(imported[0])
    tensors = export.plan(cfg, "bf16")
    sizes = []
    start = reader.read_async

    class Recorded:
        def __init__(self, future):
            self.future = future

        def result(self):
            out = self.future.result()
            sizes.append(out.nbytes)
            return out

    reader.read_async = lambda source, index=(): Recorded(start(source, index))
    budget = 20_000
    names = [name for name, _ in export.iter_tensors(reader, tensors, read_bytes=budget)]
    largest_item = max(4 * int(np.prod(p.item_shape)) for p in tensors)
    assert names == [s.name for s in export.stored_tensors(tensors)]
    assert max(sizes) <= max(budget, largest_item) and len(sizes) > len({p.source for p in tensors})


def test_import_writes_what_pretrain_restores(reference, imported):
    """The imported checkpoint restores into pretrain's target: step 0, the weights exactly, fresh optimizer."""
    restored = _restore(imported[0])
    assert restored is not None and restored.step == 0 and restored.data_state is None
    got = _flat(restored.state.params) | _flat(restored.state.extras)
    want = _flat(nnx.state(reference))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert int(restored.state.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(restored.state.opt_state))
    assert "--config=tiny --vocab_size=1024 --index_topk=16 --optimizer=adamw" in imported[1]["command"]


def test_config_fields_json_cannot_carry_come_from_the_preset(source):
    flash = get_config("flash")
    cfg = import_safetensors.read_config(source[1], "flash", param_dtype="bfloat16")
    assert (cfg.dtype, cfg.remat_policy, cfg.moe_impl, cfg.param_dtype) == (
        flash.dtype, flash.remat_policy, flash.moe_impl, "bfloat16")
    assert cfg.replace(dtype=CFG.dtype, remat_policy=CFG.remat_policy, moe_impl=CFG.moe_impl,
                       param_dtype=CFG.param_dtype) == CFG
    with pytest.raises(ValueError, match="unknown config preset 'huge'"):
        import_safetensors.read_config(source[1], "huge")


def test_bf16_export_is_bit_exact(source, exports):
    weights, _ = source
    out = exports["bf16"]["dir"]
    files = _read_dir(out)
    assert files.keys() == weights.keys()
    for k, v in weights.items():
        assert files[k].dtype == v.dtype, k
        np.testing.assert_array_equal(files[k].view(np.uint8), v.view(np.uint8), err_msg=k)
    assert exports["bf16"]["files"] > 1
    config = _json(os.path.join(out, "config.json"))
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert interop.config_from_hf(config) == interop.config_from_hf(interop.config_to_hf(CFG))
    gen = _json(os.path.join(out, "generation_config.json"))
    assert gen["temperature"] == 1.0 and gen["top_p"] == 1.0 and (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    assert all(os.path.isfile(os.path.join(out, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quantized_export_matches_quant(source, exports, fmt):
    """Values and scales are what `quant` makes of each weight; config.json carries the official fields."""
    weights, _ = source
    out = exports[fmt]["dir"]
    files = _read_dir(out)
    tensors = export.plan(CFG, fmt)
    assert files.keys() == {s.name for s in export.stored_tensors(tensors)}
    for p in tensors:
        x = np.asarray(weights[p.name], np.float32) if p.storage in ("fp8", "fp4") else weights[p.name]
        if p.storage == "fp8":
            want = quant.quantize_fp8_blocks(x)
        elif p.storage == "fp4":
            want = quant.quantize_mxfp4(x, axis=-1)
        else:
            want = (x,)
        got = (files[p.name], files[p.scale_name]) if len(want) == 2 else (files[p.name],)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype, p.name
            np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=p.name)
    assert {files[p.name].dtype for p in tensors if ".experts." in p.name} == {np.dtype(export._STORAGE_DTYPE[fmt])}
    q = _json(os.path.join(out, "config.json"))["quantization_config"]
    assert q == {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
                 "activation_scheme": "dynamic", "expert_dtype": fmt}


def test_import_loads_sharded_quantize_dequantize(source, exports):
    """Importing the fp4 export (MXFP4 experts, FP8 linears, BF16 and FP32 tensors) gives our own
    quantise-dequantise of every weight, each variable sharded over the mesh as the rules table says.
    (The bf16 path is `test_import_writes_what_pretrain_restores`; fp8 experts decode like the FP8 linears.)"""
    weights, _ = source
    fmt = "fp4"
    mesh = mesh_lib.make_mesh(MESH)
    abstract, shardings = _pretrain_target(mesh)
    files = safetensors_files.SafetensorsDir(exports[fmt]["dir"])
    tensors = export.plan(CFG)
    export.check_files(files, tensors)
    loaded = {"params": export.load_variables(files, tensors, abstract.params, shardings.params),
              "extras": export.load_variables(files, tensors, abstract.extras, shardings.extras)}
    want = _flat(nnx.state(_reference({p.name: weights[p.name] if p.storage == "i64" else
                                       _qdq(weights[p.name], p.storage) for p in export.plan(CFG, fmt)})))
    for group in ("params", "extras"):
        sharding = dict(nnx.to_flat_state(getattr(shardings, group)))
        for path, var in nnx.to_flat_state(loaded[group]):
            k = ".".join(str(x) for x in path)
            assert var.value.sharding == sharding[path].value, k
            np.testing.assert_array_equal(np.asarray(var.value), want[k], err_msg=k)
    assert any(len(v.value.sharding.device_set) == 8 and not v.value.sharding.is_fully_replicated
               for _, v in nnx.to_flat_state(loaded["params"]))


def test_transformers_loads_the_bf16_export(reference, exports):
    """DeepseekV4ForCausalLM.from_pretrained on the export directory, as a user would; its logits match those of
    our model holding the checkpoint's weights (equal to `reference`, see the restore test)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = exports["bf16"]["dir"]
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
    graphdef, state = nnx.split(reference)
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))  # weights as arguments, not compiled-in constants
    got = np.asarray(forward(state, jnp.asarray(tokens, jnp.int32)))
    err = np.abs(got - ref)
    print(f"bf16 export vs transformers: max abs {err.max():.3e}, mean abs {err.mean():.3e}")
    assert err.max() < TOLERANCES["export_bf16_logits"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Export, import: the same weights."
    assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer.get_tokenizer().encode(text).tolist()


def test_export_refuses_to_overwrite(imported, exports):
    out = exports["bf16"]["dir"]
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export_safetensors.export_run(imported[0], out, "bf16", progress=False)
    with pytest.raises(ValueError, match=r"no checkpoint for step 7 .*available steps: \[0\]"):
        export_safetensors.export_run(imported[0], out + "_new", "bf16", step=7, progress=False)
    assert not os.path.exists(out + "_new")
    marker = os.path.join(out, "stale.txt")
    open(marker, "w").close()
    export_safetensors.export_run(imported[0], out, "bf16", overwrite=True, progress=False)
    assert not os.path.exists(marker) and os.path.isfile(os.path.join(out, "config.json"))
    assert [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n or ".old-" in n] == []


def test_import_lists_missing_and_unexpected(source, tmp_path):
    weights, _ = source
    broken = dict(weights)
    broken.pop("layers.0.attn.wq_a.weight")
    broken["layers.0.attn.bogus"] = np.zeros(1, np.float32)
    src = _write_source(tmp_path / "src", CFG, broken)
    with pytest.raises(ValueError, match=r"missing \[layers.0.attn.wq_a.weight\]; unexpected \[layers.0.attn.bogus\]"):
        import_safetensors.import_run(src, str(tmp_path / "run"), devices=ONE_DEVICE, progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.export_safetensors", f"--workdir={tmp_path}/none",
                           f"--out={tmp_path}/out"], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    want = f"export_safetensors: error: no checkpoints in {tmp_path}/none/checkpoints"
    assert proc.stderr.strip().splitlines() == [want]


@pytest.mark.slow  # compiles the tiny model's forward
def test_tools_evaluate_scores_imported_weights(imported):
    """On one device, like the round trips (an 8-device mesh would only make the compile dearer)."""
    from tools import evaluate

    step, rec = evaluate.evaluate(imported[0], data="synthetic", batches=1, batch_size=8, seq_len=32,
                                  devices=ONE_DEVICE)
    assert step == 0 and np.isfinite(rec["eval_loss"]) and np.isfinite(rec["eval_mtp_loss"])
    assert rec["eval_tokens"] == 8 * 32
