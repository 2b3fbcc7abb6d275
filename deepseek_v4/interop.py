"""Conversion between our parameters and the official DeepSeek-V4 checkpoint layout (docs/checkpoints.md).

`to_hf(model)` -> (config_dict, state_dict) with the published config.json fields and the official (native)
tensor names, as unquantized numpy arrays; transformers' DeepseekV4ForCausalLM loads them (its conversion
mapping renames and fuses on load). `from_hf(config_dict, state_dict)` builds our model from them.

Names and layout transforms come from `deepseek_v4.params.PARAMS` (one row per parameter kind). The public
pieces below also serve the streaming safetensors conversion of `deepseek_v4.export`:

* `tensor_groups(cfg)`: where each row's tensors live, in our state and in the official files;
* `to_official` / `from_official` / `official_shape`: the layout transforms. Our weights are [in, out] for einsum,
  the official ones [out, in] (`linear`); multi-head projections are flattened over heads (`heads`); the grouped
  output projection is stored [G*O, N*H/G] (`grouped`); routed experts are one tensor per expert (`experts`);
  the hash table is int64 (`hash`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import params
from deepseek_v4.config import Config
from deepseek_v4.model import DeepseekV4, layer_plan
from deepseek_v4.params import ParamKind


# ---- config -------------------------------------------------------------------------------------------
def config_to_hf(cfg: Config) -> dict[str, Any]:
    """The published config.json fields (plus the modern `layer_types` spelling, which any ratio can use)."""
    kinds = {0: "sliding_attention", cfg.csa_ratio: "compressed_sparse_attention",
             cfg.hca_ratio: "heavily_compressed_attention"}
    n = cfg.num_hidden_layers
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window,
        "compress_ratios": list(cfg.compress_ratios),
        "layer_types": [kinds[r] for r in cfg.layer_ratios],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_ratio,
                           "heavily_compressed_attention": cfg.hca_ratio},
        "mlp_layer_types": ["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(n)],
        "num_hash_layers": cfg.num_hash_layers,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
                         "original_max_position_embeddings": cfg.original_max_position_embeddings,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": "bfloat16" if cfg.param_dtype == "bfloat16" else "float32",
    }


def config_from_hf(d: dict[str, Any], **overrides: Any) -> Config:
    """Our Config from a config.json dict (official `compress_ratios` or modern `layer_types` spelling)."""
    rates = d.get("compress_rates") or {}
    csa = int(rates.get("compressed_sparse_attention", d.get("compress_rate_csa", 4)))
    hca = int(rates.get("heavily_compressed_attention", d.get("compress_rate_hca", 128)))
    n = int(d["num_hidden_layers"])
    mtp = int(d.get("num_nextn_predict_layers", 1))
    if d.get("layer_types"):
        to_ratio = {"sliding_attention": 0, "compressed_sparse_attention": csa, "heavily_compressed_attention": hca}
        ratios = tuple(to_ratio[t] for t in d["layer_types"][:n]) + (0,) * mtp
    elif d.get("compress_ratios") is not None:
        ratios = tuple(int(r) for r in d["compress_ratios"][:n]) + (0,) * mtp
    else:
        raise ValueError("config has neither layer_types nor compress_ratios; the layer pattern must be explicit")
    if d.get("mlp_layer_types"):
        num_hash = sum(1 for t in d["mlp_layer_types"] if t == "hash_moe")
    else:
        num_hash = int(d.get("num_hash_layers", 3))
    rs = d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("compress") or {}
    rope_dim = d.get("qk_rope_head_dim") or int(d["head_dim"] * d.get("partial_rotary_factor", 0.125))
    defaults = Config()
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=n,
        num_attention_heads=d["num_attention_heads"], head_dim=d["head_dim"], qk_rope_head_dim=int(rope_dim),
        q_lora_rank=d["q_lora_rank"], o_groups=d["o_groups"], o_lora_rank=d["o_lora_rank"],
        compress_ratios=ratios, csa_ratio=csa, hca_ratio=hca, sliding_window=d["sliding_window"],
        index_n_heads=d["index_n_heads"], index_head_dim=d["index_head_dim"], index_topk=d["index_topk"],
        n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts", 1),
        num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["moe_intermediate_size"],
        num_hash_layers=num_hash, routed_scaling_factor=d["routed_scaling_factor"],
        swiglu_limit=d.get("swiglu_limit", defaults.swiglu_limit), hc_mult=d.get("hc_mult", defaults.hc_mult),
        hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", defaults.hc_sinkhorn_iters),
        hc_eps=d.get("hc_eps", defaults.hc_eps), rms_norm_eps=d.get("rms_norm_eps", defaults.rms_norm_eps),
        rope_theta=d.get("rope_theta", defaults.rope_theta),
        compress_rope_theta=d.get("compress_rope_theta", defaults.compress_rope_theta),
        rope_scaling_factor=rs.get("factor", defaults.rope_scaling_factor),
        original_max_position_embeddings=rs.get("original_max_position_embeddings",
                                                defaults.original_max_position_embeddings),
        beta_fast=rs.get("beta_fast", defaults.beta_fast), beta_slow=rs.get("beta_slow", defaults.beta_slow),
        max_position_embeddings=d.get("max_position_embeddings", defaults.max_position_embeddings),
        num_nextn_predict_layers=mtp, bos_token_id=d.get("bos_token_id", 0), eos_token_id=d.get("eos_token_id", 1),
        initializer_range=d.get("initializer_range", defaults.initializer_range),
    )
    fields.update(overrides)
    return Config(**fields)


# ---- tensors ------------------------------------------------------------------------------------------
def to_official(transform: str, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """Our layout -> the official one, for one item (one layer's slice of a stacked leaf).

    Shapes: "id" / "hash" unchanged (hash as int64); "linear" [in, out] -> [out, in]; "heads" [Q, N, H] ->
    [N*H, Q]; "grouped" [G, I, O] -> [G*O, I]; "experts" [E, in, out] -> a list of E arrays [out, in].
    """
    if transform == "id":
        return x
    if transform == "linear":
        return np.ascontiguousarray(x.T)
    if transform == "heads":  # [Q, N, H] -> [N*H, Q]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if transform == "grouped":  # [G, I, O] -> [G*O, I]
        return np.ascontiguousarray(x.transpose(0, 2, 1).reshape(-1, x.shape[1]))
    if transform == "experts":  # [E, in, out] -> E x [out, in]
        return [np.ascontiguousarray(w.T) for w in x]
    if transform == "hash":
        return x.astype(np.int64)
    raise ValueError(f"unknown layout transform {transform!r}")


def from_official(transform: str, x, like: jax.ShapeDtypeStruct) -> np.ndarray:
    """The official layout -> ours, as `like.dtype` of shape `like.shape` (inverse of `to_official`; "experts"
    takes the list of per-expert arrays).

    Raises:
      ValueError: unknown transform, or the result does not have `like`'s shape.
    """
    shape = like.shape
    if transform == "id":
        y = np.asarray(x)
    elif transform == "linear":
        y = np.asarray(x).T
    elif transform == "heads":
        y = np.asarray(x).T.reshape(shape)
    elif transform == "grouped":
        g, i, o = shape
        y = np.asarray(x).reshape(g, o, i).transpose(0, 2, 1)
    elif transform == "experts":
        y = np.stack([np.asarray(w).T for w in x])
    elif transform == "hash":
        y = np.asarray(x)
    else:
        raise ValueError(f"unknown layout transform {transform!r}")
    if y.shape != tuple(shape):
        raise ValueError(f"shape mismatch: expected {tuple(shape)}, got {y.shape}")
    return y.astype(like.dtype)


def official_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official shape of one item of our `shape` ("experts": of one expert, [out, in])."""
    s = tuple(shape)
    if transform in ("id", "hash"):
        return s
    if transform == "linear":
        return (s[1], s[0])
    if transform == "heads":  # [Q, N, H] -> [N*H, Q]
        return (s[1] * s[2], s[0])
    if transform == "grouped":  # [G, I, O] -> [G*O, I]
        return (s[0] * s[2], s[1])
    if transform == "experts":  # [E, in, out] -> [out, in] per expert
        return (s[2], s[1])
    raise ValueError(f"unknown layout transform {transform!r}")


class TensorGroup(NamedTuple):
    """The tensors of one scope instance: a layer, an MTP module's own tensors, or the model root.

    Attributes:
      prefix: our flat state path prefix (e.g. "stack.blocks.1."; "" for the root).
      layer: the index into the leading layers axis of a scanned stack's leaves; None when not stacked.
      official_prefix: the official name prefix (e.g. "layers.5."; "" for the root).
      kinds: the `deepseek_v4.params` rows of the scope, in the order of the official files. A layer without a
        compressor or a hash table lacks some of them: skip the rows whose path is not in the state.
    """

    prefix: str
    layer: int | None
    official_prefix: str
    kinds: tuple[ParamKind, ...]


def tensor_groups(cfg: Config) -> Iterator[TensorGroup]:
    """Every tensor group of `cfg`'s model: the root, the prefix layers, the scanned stack (one group per layer),
    then per MTP module its block and its own tensors."""
    prefix, unit, repeats = layer_plan(cfg)
    layer, mtp = params.in_scope(params.LAYER), params.in_scope(params.MTP)
    yield TensorGroup("", None, "", params.in_scope(params.MODEL))
    for i in range(prefix):
        yield TensorGroup(f"prefix.{i}.", None, f"layers.{i}.", layer)
    for j in range(unit):
        for r in range(repeats):
            yield TensorGroup(f"stack.blocks.{j}.", r, f"layers.{prefix + r * unit + j}.", layer)
    for k in range(cfg.num_nextn_predict_layers):
        yield TensorGroup(f"mtp.{k}.block.", None, f"mtp.{k}.", layer)
        yield TensorGroup(f"mtp.{k}.", None, f"mtp.{k}.", mtp)


def _flat_state(model) -> dict[str, Any]:
    state = nnx.state(model)
    return {params.path_str(path): v for path, v in nnx.to_flat_state(state)}


def to_hf(model: DeepseekV4) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config_dict, state_dict) in the official layout, as numpy arrays (float32 / bfloat16 / int64)."""
    cfg = model.cfg
    flat = _flat_state(model)
    out: dict[str, np.ndarray] = {}
    used = set()
    for group in tensor_groups(cfg):
        for kind in group.kinds:
            key = group.prefix + kind.path
            if key not in flat:
                continue
            used.add(key)
            x = np.asarray(jax.device_get(flat[key][...]))
            if group.layer is not None:
                x = x[group.layer]
            y = to_official(kind.transform, x)
            if kind.transform == "experts":
                for e, w in enumerate(y):
                    out[group.official_prefix + kind.official.format(e=e)] = w
            else:
                out[group.official_prefix + kind.official] = y
    missing = sorted(set(flat) - used)
    if missing:
        raise ValueError(f"no checkpoint name for parameter(s): {', '.join(missing)}")
    return config_to_hf(cfg), out


def from_hf(config_dict: dict[str, Any], state_dict: dict[str, Any], **config_overrides: Any) -> DeepseekV4:
    """Build our model from an official-layout (config, state_dict); missing and unexpected tensors are listed in
    one error. Tensors may be numpy arrays or anything np.asarray accepts."""
    cfg = config_from_hf(config_dict, **config_overrides)
    abstract = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    by_name = {params.path_str(path): path for path in flat}
    values: dict[str, list] = {}
    consumed: set[str] = set()
    missing: list[str] = []
    for group in tensor_groups(cfg):
        for kind in group.kinds:
            key = group.prefix + kind.path
            if key not in by_name:
                continue
            like = flat[by_name[key]]
            like = jax.ShapeDtypeStruct(like.shape[1:] if group.layer is not None else like.shape, like.dtype)
            if kind.transform == "experts":
                names = [group.official_prefix + kind.official.format(e=e) for e in range(like.shape[0])]
            else:
                names = [group.official_prefix + kind.official]
            absent = [nm for nm in names if nm not in state_dict]
            if absent:
                missing += absent
                continue
            consumed.update(names)
            src = [state_dict[nm] for nm in names] if kind.transform == "experts" else state_dict[names[0]]
            try:
                arr = from_official(kind.transform, src, like)
            except ValueError as e:
                raise ValueError(f"{names[0]}: {e}") from None
            values.setdefault(key, []).append((group.layer, arr))
    unexpected = sorted(k for k in state_dict if k not in consumed and not re.match(r"^mtp\.\d+\.$", k))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {sorted(missing) or 'none'}; "
                         f"unexpected {unexpected or 'none'}")
    new_flat = []
    for key, path in by_name.items():
        parts = values[key]
        if parts[0][0] is None:
            arr = parts[0][1]
        else:
            arr = np.stack([a for _, a in sorted(parts, key=lambda p: p[0])])
        new_flat.append((path, flat[path].replace(jnp.asarray(arr))))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))
