"""Streaming conversion between a training checkpoint and the official DeepSeek-V4 safetensors layout.

The official files hold one tensor per (layer, expert) under the names of `deepseek_v4.params.PARAMS` (placed by
`interop.tensor_groups`), in the storage formats of docs/checkpoints.md. Each row's storage class (`storage_of`)
decides its dtype in each format:

  format  FP8-class linears          routed experts              BF16-class        FP32-class  hash table
  bf16    BF16                       BF16                        BF16              F32         I64
  fp8     F8_E4M3 + `.scale` (E8M0)   F8_E4M3 + `.scale`          BF16              F32         I64
  fp4     F8_E4M3 + `.scale`          I8 packed MXFP4 + `.scale`  BF16              F32         I64

Which tensor is in which class is its row's `storage` in `deepseek_v4.params.PARAMS`. The scale of `X.weight` is
`X.scale` (FP8: [ceil(out/128), ceil(in/128)]; MXFP4: [out, in/32]).

Conversion works one tensor at a time, so the host memory it needs is a small multiple of the largest tensor
(an import still materialises the model itself, on its devices):

* `plan(cfg, fmt)` lists every official tensor (name, source leaf, layer/expert index, layout transform,
  shape, storage) without touching data;
* `StateReader` reads slices of single arrays of an Orbax train-state checkpoint through tensorstore;
* `iter_tensors` yields the stored (name, array) pairs of a plan, reading the checkpoint in bounded blocks;
* `safetensors_files.SafetensorsWriter` streams them into sharded `.safetensors` files whose headers are known
  in advance (`stored_tensors`);
* `safetensors_files.SafetensorsDir` + `load_variables` read official or exported files (any format) back,
  dequantising, straight into sharded model variables (`jax.make_array_from_callback`: each device shard is
  assembled from the official tensors it covers).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from deepseek_v4 import interop, params, quant
from deepseek_v4.config import Config
from deepseek_v4.model import DeepseekV4
from deepseek_v4.safetensors_files import SafetensorsDir, StoredTensor

FORMATS = ("bf16", "fp8", "fp4")

_STORAGE_DTYPE = {"bf16": ml_dtypes.bfloat16, "f32": np.float32, "i64": np.int64, "fp8": ml_dtypes.float8_e4m3fn,
                  "fp4": np.int8}


def quantization_config(fmt: str) -> dict[str, Any] | None:
    """The config.json `quantization_config` of an export format (None for bf16, where it is omitted)."""
    if fmt == "bf16":
        return None
    return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
            "activation_scheme": "dynamic", "expert_dtype": "fp4" if fmt == "fp4" else "fp8"}


def hf_config(cfg: Config, fmt: str) -> dict[str, Any]:
    """config.json of an export: the published fields (`interop.config_to_hf`) plus the quantisation fields."""
    d = dict(interop.config_to_hf(cfg), torch_dtype="bfloat16")
    q = quantization_config(fmt)
    if q is not None:
        d["quantization_config"] = q
        d["expert_dtype"] = q["expert_dtype"]
    return d


# ---- the plan ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Planned:
    """One official tensor: where it comes from in our state and how it is stored.

    Attributes:
      name: the official name (e.g. `layers.3.attn.wq_a.weight`).
      source: our flat state path of the leaf holding it (e.g. `stack.blocks.1.attn.wq_a`).
      index: the leading indices of the leaf that select it: (layer,) in a scanned stack, (expert,) for a routed
        expert, (layer, expert) for both, () otherwise.
      kind: the `interop` layout transform of the selected item ("id", "linear", "heads", "grouped", "hash").
      item_shape: the selected item's shape in our layout.
      shape: the official (unquantised) shape.
      storage: "bf16", "f32", "i64", "fp8" or "fp4".
    """

    name: str
    source: str
    index: tuple[int, ...]
    kind: str
    item_shape: tuple[int, ...]
    shape: tuple[int, ...]
    storage: str

    @property
    def scale_name(self) -> str:
        return self.name.removesuffix(".weight") + ".scale"

    def stored(self) -> list[StoredTensor]:
        """The tensors the files hold for it: the values, plus the UE8M0 scale when quantised."""
        dtype = np.dtype(_STORAGE_DTYPE[self.storage])
        e8m0 = np.dtype(ml_dtypes.float8_e8m0fnu)
        if self.storage == "fp8":
            out, inp = self.shape
            scale = (-(-out // quant.FP8_BLOCK), -(-inp // quant.FP8_BLOCK))
            return [StoredTensor(self.name, dtype, self.shape), StoredTensor(self.scale_name, e8m0, scale)]
        if self.storage == "fp4":
            out, inp = self.shape
            return [StoredTensor(self.name, dtype, (out, inp // 2)),
                    StoredTensor(self.scale_name, e8m0, (out, inp // quant.FP4_BLOCK))]
        return [StoredTensor(self.name, dtype, self.shape)]


def storage_of(kind: params.ParamKind, fmt: str) -> str:
    """How an export format stores the tensors of a row: "bf16", "f32", "i64", "fp8" or "fp4"."""
    if kind.storage == params.FP8:
        return "bf16" if fmt == "bf16" else "fp8"
    if kind.storage == params.EXPERT:
        return fmt  # bf16, fp8 or fp4
    return kind.storage  # bf16, f32 or i64 in every format


@functools.cache
def abstract_variables(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Every model variable (parameters and non-trainable ones) by flat state path, as shape and dtype.
    Cached per config: do not mutate the result."""
    model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        out[params.path_str(path)] = jax.ShapeDtypeStruct(var.value.shape, var.value.dtype)
    return out


def plan(cfg: Config, fmt: str = "bf16") -> list[Planned]:
    """Every official tensor of `cfg`'s model, grouped by source leaf (leaves in model order, items row-major).

    Raises:
      ValueError: unknown format; fp4 with a routed-expert input width that is not a multiple of 32.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    shapes = abstract_variables(cfg)
    groups: dict[str, list[Planned]] = {}
    for group in interop.tensor_groups(cfg):
        for kind in group.kinds:
            key = group.prefix + kind.path
            if key not in shapes:
                continue
            leaf = tuple(shapes[key].shape)
            lead = () if group.layer is None else (group.layer,)
            item = leaf[len(lead):]
            storage = storage_of(kind, fmt)
            shape = interop.official_shape(kind.transform, item)
            rows = groups.setdefault(key, [])
            if kind.transform == "experts":
                if storage == "fp4" and shape[1] % quant.FP4_BLOCK:
                    raise ValueError(f"fp4 export needs routed-expert input widths that are multiples of "
                                     f"{quant.FP4_BLOCK}; {key} has {shape[1]}")
                rows += [Planned(group.official_prefix + kind.official.format(e=e), key, lead + (e,), "linear",
                                 item[1:], shape, storage) for e in range(item[0])]
            else:
                rows.append(Planned(group.official_prefix + kind.official, key, lead, kind.transform, item, shape,
                                    storage))
    uncovered = sorted(set(shapes) - set(groups))
    if uncovered:
        raise ValueError(f"no checkpoint name for variable(s): {', '.join(uncovered)}")
    return [p for rows in groups.values() for p in sorted(rows, key=lambda p: p.index)]


def stored_tensors(tensors: Sequence[Planned]) -> list[StoredTensor]:
    """The stored tensors of a plan, in writing order."""
    return [s for p in tensors for s in p.stored()]


# ---- conversion of one tensor -------------------------------------------------------------------------------


def encode(p: Planned, item: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Our-layout item -> the stored (name, array) pairs of `p` (quantised with `quant`, as the official files).

    Shapes:
      item `p.item_shape` (e.g. wq_b [Q, N, H], one expert's w1 [D, F]) -> official `p.shape` ([N*H, Q], [F, D]);
      fp8 adds a scale [ceil(out/128), ceil(in/128)]; fp4 stores [out, in/2] int8 plus a scale [out, in/32].

    Raises:
      ValueError: the item holds NaN or inf (named), or has the wrong shape.
    """
    if tuple(item.shape) != p.item_shape:
        raise ValueError(f"{p.name}: expected a {p.item_shape} source, got {tuple(item.shape)}")
    y = interop.to_official(p.kind, np.asarray(item))
    if p.storage == "i64":
        return [(p.name, y.astype(np.int64))]
    if p.storage in ("fp8", "fp4"):
        try:
            if p.storage == "fp8":
                values, scale = quant.quantize_fp8_blocks(y)
            else:
                values, scale = quant.quantize_mxfp4(y, axis=-1)
        except ValueError as e:  # NaN / inf
            raise ValueError(f"{p.name} ({p.source}): {e}") from None
        return [(p.name, values), (p.scale_name, scale)]
    out = np.ascontiguousarray(y.astype(_STORAGE_DTYPE[p.storage], copy=False))
    if not np.isfinite(out).all():
        raise ValueError(f"{p.name} ({p.source}) holds values that are NaN or inf in {p.storage}; refusing to export")
    return [(p.name, out)]


def decode(p: Planned, files: SafetensorsDir) -> np.ndarray:
    """The official-layout values of `p` from files in any format: float32 (dequantised) or the stored dtype.

    Raises:
      ValueError: wrong shape, or a quantised tensor whose `.scale` does not fit it.
    """
    values = files.read(p.name)
    if values.dtype == ml_dtypes.float8_e4m3fn:
        y = quant.dequantize_fp8_blocks(values, files.read(p.scale_name))
    elif values.dtype in (np.int8, np.uint8):
        y = quant.dequantize_mxfp4(values, files.read(p.scale_name), axis=-1)
    else:
        y = values
    if tuple(y.shape) != p.shape:
        raise ValueError(f"{p.name}: shape {tuple(y.shape)} does not match the config's {p.shape}")
    return y


def to_item(p: Planned, official: np.ndarray, dtype: Any) -> np.ndarray:
    """Official-layout values of `p` -> our layout item of `dtype`. Shapes: `p.shape` -> `p.item_shape`."""
    return interop.from_official(p.kind, official, jax.ShapeDtypeStruct(p.item_shape, dtype))


# ---- reading a train-state checkpoint ---------------------------------------------------------------------


class StateReader:
    """Sliced reads of single arrays of an Orbax train-state checkpoint (the `state/` item of a step).

    Arrays are opened lazily with tensorstore, so reading one layer of one stacked weight reads only the
    chunks that hold it, never the whole checkpoint.
    """

    def __init__(self, state_dir: str):
        self.directory = epath.Path(os.path.abspath(state_dir))
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self.directory)
        except Exception as e:
            raise ValueError(f"cannot read the checkpoint metadata in {state_dir}: {str(e).splitlines()[0]}") from e
        self._zarr3 = bool(meta.use_zarr3)
        self._arrays = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(meta.tree)[0]:
            self._arrays[".".join(params.path_keys(path))] = leaf
        self._variables = {}
        for name, leaf in self._arrays.items():
            group, _, rest = name.partition(".")
            if group in ("params", "extras") and rest.endswith(".value"):
                self._variables[rest.removesuffix(".value")] = (tuple(leaf.shape), np.dtype(leaf.dtype))
        self._open: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._context = ocp.type_handlers.get_ts_context()

    def name(self, source: str) -> str:
        """Checkpoint array name of a model variable path (trainable `params.` or non-trainable `extras.`)."""
        for group in ("params", "extras"):
            name = f"{group}.{source}.value"
            if name in self._arrays:
                return name
        raise KeyError(source)

    def variables(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every model variable in the checkpoint, by our flat state path."""
        return dict(self._variables)

    def _store(self, name: str):
        if name not in self._open:
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=self.directory, use_zarr3=self._zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
            self._open[name] = ts.open(spec, open=True, context=self._context).result()
            while len(self._open) > 8:
                self._open.popitem(last=False)
        return self._open[name]

    def read_async(self, source: str, index: tuple[slice, ...] = ()) -> Any:
        """Start reading `variable[index]` of the model variable at `source`; `.result()` is the numpy array."""
        return self._store(self.name(source))[index].read()

    def read(self, source: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """`variable[index]` of the model variable at `source`, as numpy."""
        return np.asarray(self.read_async(source, index).result())


def check_state(reader: StateReader, tensors: Sequence[Planned], cfg: Config) -> None:
    """Raise one ValueError listing every variable whose presence or shape differs from `cfg`'s model."""
    want = {k: tuple(v.shape) for k, v in abstract_variables(cfg).items()}
    have = {k: s for k, (s, _) in reader.variables().items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k} has shape {have[k]}, the config says {want[k]}" for k in sorted(set(want) & set(have))
                 if have[k] != want[k]]
    if problems:
        raise ValueError("the checkpoint does not match its config: " + _listing(problems))


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _blocks(lead: tuple[int, ...], per_read: int) -> Iterator[tuple[slice, ...]]:
    """Row-major blocks of the leading index space with at most max(per_read, 1) items each."""
    if not lead:
        yield ()
        return
    inner = math.prod(lead[1:])
    if per_read >= inner:
        step = per_read // inner
        for i in range(0, lead[0], step):
            yield (slice(i, min(i + step, lead[0])),)
        return
    for i in range(lead[0]):
        for rest in _blocks(lead[1:], per_read):
            yield (slice(i, i + 1),) + rest


def iter_tensors(reader: StateReader, tensors: Sequence[Planned],
                 read_bytes: int = 64 << 20) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the stored (name, array) pairs of `tensors` (a `plan`) in order, reading each source leaf in
    row-major blocks of at most `read_bytes` (or one item, if larger). The next block is read while the current
    one is converted when it fits in `read_bytes`, so at most one item or 2 * `read_bytes` is held.

    Raises:
      ValueError: a source holds NaN or inf, or a shape differs from the plan.
    """
    variables = reader.variables()
    reads = []  # (items by index, lead rank, source, block, bytes), in writing order
    i = 0
    while i < len(tensors):
        source = tensors[i].source
        j = i
        while j < len(tensors) and tensors[j].source == source:
            j += 1
        by_index = {p.index: p for p in tensors[i:j]}
        lead_rank = len(tensors[i].index)
        shape, dtype = variables[source]
        lead, item_bytes = shape[:lead_rank], math.prod(shape[lead_rank:]) * dtype.itemsize
        for block in _blocks(lead, max(1, read_bytes // max(item_bytes, 1))):
            items = math.prod(s.stop - s.start for s in block) * math.prod(lead[len(block):])
            reads.append((by_index, lead_rank, source, block, items * item_bytes))
        i = j
    pending = None
    for k, (by_index, lead_rank, source, block, _) in enumerate(reads):
        future = pending if pending is not None else reader.read_async(source, block)
        pending = None
        if k + 1 < len(reads) and reads[k + 1][4] <= read_bytes:
            pending = reader.read_async(reads[k + 1][2], reads[k + 1][3])
        data = np.asarray(future.result())
        starts = tuple(s.start for s in block) + (0,) * (lead_rank - len(block))
        for rel in np.ndindex(*data.shape[:lead_rank]):
            index = tuple(a + b for a, b in zip(starts, rel))
            yield from encode(by_index[index], data[rel])
        del data, future


def _decoded_shape(p: Planned, files: SafetensorsDir) -> tuple[int, ...]:
    shape = files.shape(p.name)
    if files.dtype(p.name) in ("I8", "U8") and len(shape) == 2:
        return (shape[0], shape[1] * 2)
    return shape


def check_files(files: SafetensorsDir, tensors: Sequence[Planned]) -> None:
    """Raise one ValueError listing missing and unexpected tensors and shape mismatches against a plan."""
    present = files.names()
    missing, expected, bad = [], set(), []
    for p in tensors:
        expected.add(p.name)
        if p.name not in present:
            missing.append(p.name)
            continue
        if files.dtype(p.name) in ("F8_E4M3", "I8", "U8"):
            expected.add(p.scale_name)
            if p.scale_name not in present:
                missing.append(p.scale_name)
        if _decoded_shape(p, files) != p.shape:
            bad.append(f"{p.name} {list(_decoded_shape(p, files))} (config: {list(p.shape)})")
    unexpected = sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"the files do not match the config: missing [{_listing(sorted(missing)) or 'none'}]; "
                         f"unexpected [{_listing(unexpected) or 'none'}]")
    if bad:
        raise ValueError("tensor shapes do not match the config: " + _listing(bad))


class _ItemCache:
    """Our-layout items by official name, least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
        return value


def load_variables(files: SafetensorsDir, tensors: Sequence[Planned], abstract: nnx.State, shardings: nnx.State,
                   *, cache_bytes: int = 512 << 20, progress: Callable[[int], None] | None = None) -> nnx.State:
    """Model variables from safetensors files, each device shard assembled from the official tensors it covers.

    Args:
      files: the official or exported files (bf16, fp8 or fp4).
      tensors: `plan(cfg)` of the model (any format: the files' dtypes decide how each tensor is decoded).
      abstract: an `nnx.State` of `jax.ShapeDtypeStruct` variables (e.g. the `params` of an abstract train state).
      shardings: the same structure holding one `jax.sharding.Sharding` per variable.
      cache_bytes: decoded items kept for reuse by other shards of the same variable.
      progress: called with the number of elements of each variable once it is loaded.

    Returns:
      `abstract` with every variable holding a sharded `jax.Array` of its dtype.
    """
    by_source: dict[str, dict[tuple[int, ...], Planned]] = {}
    for p in tensors:
        by_source.setdefault(p.source, {})[p.index] = p
    cache = _ItemCache(cache_bytes)
    shard_of = {params.path_str(path): v for path, v in nnx.to_flat_state(shardings)}
    out = []
    for path, var in nnx.to_flat_state(abstract):
        key = params.path_str(path)
        like = var.value
        items = by_source[key]
        lead_rank = len(next(iter(items)))

        def item(index, items=items, dtype=like.dtype):
            p = items[index]
            return cache.get(p.name, lambda: to_item(p, decode(p, files), dtype))

        def region(index, shape=like.shape, lead_rank=lead_rank, item=item, dtype=like.dtype):
            sl = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            if lead_rank == 0:
                return np.ascontiguousarray(item(())[sl])
            lead, rest = sl[:lead_rank], sl[lead_rank:]
            buf = np.empty(tuple(s.stop - s.start for s in sl), dtype)
            for rel in np.ndindex(*buf.shape[:lead_rank]):
                buf[rel] = item(tuple(s.start + r for s, r in zip(lead, rel)))[rest]
            return buf

        memo: dict[tuple, np.ndarray] = {}

        def callback(index, region=region, memo=memo):
            k = tuple((s.start, s.stop) for s in index)
            if k not in memo:
                memo[k] = region(index)
            return memo[k]

        arr = jax.make_array_from_callback(like.shape, shard_of[key].value, callback)
        memo.clear()
        out.append((path, var.replace(arr)))
        if progress is not None:
            progress(math.prod(like.shape))
    return nnx.from_flat_state(out)


# ---- training checkpoints of a run directory ----------------------------------------------------------------


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoints of a run directory (`<workdir>/checkpoints/<step>/`), oldest first."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def open_checkpoint(workdir: str, step: int | None = None) -> tuple[int, Config, StateReader]:
    """(step, config, reader) of the newest (or the given) checkpoint of a run directory, read-only.

    Raises:
      ValueError: no such run directory or step, or an unreadable config.
    """
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"no checkpoints in {os.path.join(workdir, 'checkpoints')}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {workdir}; available steps: {steps}")
    step_dir = epath.Path(os.path.abspath(os.path.join(workdir, "checkpoints", str(step))))
    try:
        saved = ocp.JsonCheckpointHandler().restore(step_dir / "config")
        cfg = Config.from_dict(dict(saved))
    except Exception as e:
        raise ValueError(f"cannot read the config of step {step}: {str(e).splitlines()[0]}") from e
    return step, cfg, StateReader(str(step_dir / "state"))
