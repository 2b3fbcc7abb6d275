"""Generation with the compressed KV cache: chunked prefill, one-token decode, sampling, MTP speculative decoding.

    new = inference.generate(model, prompts, max_new_tokens=32, greedy=True)

`prompts` is a list of token-id lists (any lengths); the result holds each prompt's new tokens, ending with the
EOS token when the model emitted it. The cache (deepseek_v4/kv_cache.py, docs/model.md "Inference cache") has
fixed shapes: one compiled prefill-chunk function and one decode function per model and cache size. The model's
own layer code runs on every path (`Block.apply` with the cached attention), so the decoded logits equal the
full forward's at every position.

Speculative decoding (`speculative=True`, greedy only): the MTP head drafts the token after next; the main model
verifies [current, draft] in one chunk of two; the draft is kept iff it equals the main model's greedy choice, so
the output is exactly greedy decoding's. A rejected draft is undone by setting the cache length back.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from deepseek_v4 import layers
from deepseek_v4.attention import Context
from deepseek_v4.kv_cache import attend_cached, init_layer_cache, layer_cache_bytes
from deepseek_v4.model import STREAM_AXES, DeepseekV4

# V4's recommended sampling defaults.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


# ---- the cache of the whole model ------------------------------------------------------------------------

def init_cache(model: DeepseekV4, batch: int, max_len: int) -> dict:
    """Empty cache for `batch` sequences of up to `max_len` tokens: per-layer dicts (kv_cache.py) and lengths."""
    stack = []
    for block in (model.stack.blocks if model.repeats else []):
        one = init_layer_cache(block.attn, batch, max_len)
        stack.append(jax.tree.map(lambda a: jnp.zeros((model.repeats,) + a.shape, a.dtype), one))
    return {"length": jnp.zeros((batch,), jnp.int32),
            "prefix": [init_layer_cache(b.attn, batch, max_len) for b in model.prefix],
            "stack": stack,
            "mtp": [init_layer_cache(m.block.attn, batch, max_len) for m in model.mtp]}


def cache_bytes(cache: dict, with_mtp: bool = False) -> int:
    """Bytes the cache holds (main layers; MTP's window too with `with_mtp`)."""
    parts = cache["prefix"] + cache["stack"] + (cache["mtp"] if with_mtp else [])
    return sum(layer_cache_bytes(c) for c in parts)


def _context(tokens: jax.Array, n: jax.Array, valid: jax.Array) -> Context:
    rows = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    seg = (rows[None, :] < valid[:, None]).astype(jnp.int32)  # 0 = padding rows (no expert slot, no cache write)
    return Context(tokens.astype(jnp.int32), seg, n[:, None] + rows[None, :])


def trunk_chunk(model: DeepseekV4, cache: dict, tokens: jax.Array, valid: jax.Array, with_routing: bool = False):
    """The main model on a chunk at positions length .. length + S - 1 (rows >= valid are padding).

    Shapes: tokens [B, S], valid [B] -> streams [B, S, R, D], hidden [B, S, D], cache (its length unchanged);
    with `with_routing` also each main layer's experts [num_hidden_layers, B, S, K] int32 (routing replay).
    """
    cfg = model.cfg
    n = cache["length"]
    ctx = _context(tokens, n, valid)
    emb = jnp.take(model.embed[...], ctx.tokens, axis=0).astype(layers.dtype_of(cfg.dtype))
    x = jnp.broadcast_to(emb[:, :, None, :], emb.shape[:2] + (cfg.hc_mult, cfg.hidden_size))
    x = sharding.constrain(x, STREAM_AXES)

    def run(block, x, c):
        x, stats, c = block.apply(x, ctx, lambda h: attend_cached(block.attn, h, ctx, n, valid, c))
        return x, c, stats.expert_ids

    prefix, routing = [], []
    for block, c in zip(model.prefix, cache["prefix"]):
        x, c, ids = run(block, x, c)
        prefix.append(c)
        routing.append(ids[None])
    stack = cache["stack"]
    if model.repeats:
        graphdef, state = nnx.split(model.stack)

        def body(x, xs):
            unit = nnx.merge(graphdef, xs[0])
            out, ids = [], []
            for block, c in zip(unit.blocks, xs[1]):
                x, c, i = run(block, x, c)
                out.append(c)
                ids.append(i)
            return sharding.constrain(x, STREAM_AXES), (out, jnp.stack(ids))

        x, (stack, stack_ids) = jax.lax.scan(body, x, (state, stack))  # stack_ids [repeats, unit, B, S, K]
        routing.append(stack_ids.reshape((-1,) + stack_ids.shape[2:]))
    hidden = model.norm(model.hc_head(x))
    out = (x, hidden, {**cache, "prefix": prefix, "stack": stack})
    return out + (jnp.concatenate(routing),) if with_routing else out


def mtp_chunk(model: DeepseekV4, cache: dict, streams: jax.Array, next_tokens: jax.Array, n: jax.Array,
              valid: jax.Array):
    """The first MTP module at positions n .. n + S - 1, given the main streams there and the tokens one ahead.

    Shapes: streams [B, S, R, D], next_tokens [B, S], n / valid [B] -> hidden [B, S, D] (predicts position + 2).
    """
    module = model.mtp[0]
    dt = layers.dtype_of(model.cfg.dtype)
    ctx = _context(next_tokens, n, valid)
    x = module.block_input(streams, jnp.take(model.embed[...], ctx.tokens, axis=0).astype(dt), dt)
    x, _, c = module.block.apply(x, ctx, lambda h: attend_cached(module.block.attn, h, ctx, n, valid,
                                                                 cache["mtp"][0]))
    return module.norm(module.hc_head(x)), {**cache, "mtp": [c] + cache["mtp"][1:]}


def _logits(model: DeepseekV4, hidden: jax.Array) -> jax.Array:
    return hidden @ model.head[...].astype(jnp.float32)


def _rows(a: jax.Array, rows: jax.Array) -> jax.Array:
    """a [B, S, ...] at one row per sequence [B] -> [B, ...]."""
    return jnp.take_along_axis(a, rows.reshape((-1, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]


# ---- sampling ---------------------------------------------------------------------------------------------

def sampling_logits(logits: jax.Array, *, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """The logits `sample` draws from: divided by the temperature, -inf outside the top-k then top-p set.

    top_k 0 keeps every token; top_p keeps the smallest set of most likely tokens whose probability reaches it
    (the most likely token always stays). Shapes: [B, V] float32 -> [B, V].
    """
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, *, greedy: bool, temperature: float, top_p: float,
           top_k: int) -> jax.Array:
    """Next tokens from float32 logits [B, V] -> [B] int32: argmax, or a draw from `sampling_logits`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = sampling_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---- compiled steps ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _steps(graphdef):
    """Jitted functions of (model state, cache, ...) for one model structure (shapes retrace as usual)."""

    def prefill(state, cache, tokens, valid, mtp_next, mtp_valid, *, with_mtp: bool):
        model = nnx.merge(graphdef, state)
        x, hidden, cache = trunk_chunk(model, cache, tokens, valid)
        rows = jnp.maximum(valid - 1, 0)
        if with_mtp:
            _, cache = mtp_chunk(model, cache, x, mtp_next, cache["length"], mtp_valid)
        cache = {**cache, "length": cache["length"] + valid}
        return _logits(model, _rows(hidden, rows)), _rows(x, rows), cache

    def decode(state, cache, tokens, key, *, sampling: tuple):
        model = nnx.merge(graphdef, state)
        one = jnp.ones_like(cache["length"])
        _, hidden, cache = trunk_chunk(model, cache, tokens[:, None], one)
        logits = _logits(model, hidden[:, 0])
        greedy, temperature, top_p, top_k = sampling
        nxt = sample(logits, key, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k)
        return nxt, logits, {**cache, "length": cache["length"] + 1}

    def draft(state, cache, streams, tokens, n):
        """MTP at position n (streams [B, R, D], the token at n + 1 [B]) -> its greedy draft for n + 2."""
        model = nnx.merge(graphdef, state)
        hidden, cache = mtp_chunk(model, cache, streams[:, None], tokens[:, None], n, jnp.ones_like(n))
        return jnp.argmax(_logits(model, hidden[:, 0]), -1).astype(jnp.int32), cache

    def verify(state, cache, current, drafted):
        """Main model on [current, draft]; keeps the draft iff it is the greedy choice; MTP drafts again."""
        model = nnx.merge(graphdef, state)
        n = cache["length"]
        tokens = jnp.stack([current, drafted], axis=1)
        x, hidden, cache = trunk_chunk(model, cache, tokens, jnp.full_like(n, 2))
        greedy = jnp.argmax(_logits(model, hidden), -1).astype(jnp.int32)  # [B, 2]
        accepted = greedy[:, 0] == drafted
        count = jnp.where(accepted, 2, 1)
        mtp_hidden, cache = mtp_chunk(model, cache, x, greedy, n, count)
        new_draft = jnp.argmax(_logits(model, _rows(mtp_hidden, count - 1)), -1).astype(jnp.int32)
        cache = {**cache, "length": n + count}
        return greedy, count, new_draft, cache

    return (jax.jit(prefill, static_argnames="with_mtp", donate_argnums=1),
            jax.jit(decode, static_argnames="sampling", donate_argnums=1),
            jax.jit(draft, donate_argnums=1),
            jax.jit(verify, donate_argnums=1))


# ---- generation -------------------------------------------------------------------------------------------

def _check(model: DeepseekV4, prompts, max_new_tokens: int, max_len: int | None, greedy: bool, temperature,
           top_p, top_k, speculative: bool) -> int:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.cfg.vocab_size
    if any(not 0 <= int(t) < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                         f"{top_p}, {top_k}")
    if speculative and not (greedy and len(model.mtp)):
        raise ValueError("speculative decoding needs greedy=True and a model with an MTP module")
    need = max(len(p) for p in prompts) + max_new_tokens + (1 if speculative else 0)
    if max_len is None:
        return -(-need // 64) * 64
    if need > max_len:
        raise ValueError(f"the longest prompt ({max(len(p) for p in prompts)} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) needs a cache of {need} tokens; max_len is {max_len}")
    return max_len


def prefill(model: DeepseekV4, prompts, max_len: int, chunk: int = 64, with_mtp: bool = False):
    """Fills a new cache with the prompts, `chunk` tokens at a time.

    Returns (logits [B, V] float32 of each prompt's last token, main streams [B, R, D] there, cache).
    With `with_mtp` the MTP cache is filled too, for every prompt position but the last (its next token is not
    known yet).
    """
    graphdef, state = nnx.split(model)
    prefill_fn = _steps(graphdef)[0]
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    b, longest = len(prompts), int(lengths.max())
    chunk = min(chunk, 1 << (longest - 1).bit_length())  # a power of two: few compiled chunk shapes
    n_chunks = -(-longest // chunk)
    padded = np.zeros((b, n_chunks * chunk + 1), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    cache = init_cache(model, b, max_len)
    last_logits, last_streams = None, None
    for k in range(n_chunks):
        start = k * chunk
        valid = np.clip(lengths - start, 0, chunk).astype(np.int32)
        mtp_valid = np.clip(lengths - 1 - start, 0, chunk).astype(np.int32)
        logits, streams, cache = prefill_fn(state, cache, padded[:, start: start + chunk], valid,
                                            padded[:, start + 1: start + chunk + 1], mtp_valid, with_mtp=with_mtp)
        ends_here = jnp.asarray((valid > 0) & (start + valid == lengths))
        if last_logits is None:
            last_logits, last_streams = logits, streams
        else:
            last_logits = jnp.where(ends_here[:, None], logits, last_logits)
            last_streams = jnp.where(ends_here[:, None, None], streams, last_streams)
    return last_logits, last_streams, cache


def stream(model: DeepseekV4, prompts, max_new_tokens: int = 32, *, greedy: bool = True,
           temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, top_k: int = 0, seed: int = 0,
           speculative: bool = False, max_len: int | None = None, prefill_chunk: int = 64,
           stats: dict | None = None) -> Iterator[list[list[int]]]:
    """`generate` step by step: yields, per step, the tokens each prompt gained (lists; empty once finished).

    With `speculative`, `stats` (if given) receives "drafts" and "accepted": the MTP drafts checked and kept
    while their sequence was unfinished.
    """
    max_len = _check(model, prompts, max_new_tokens, max_len, greedy, temperature, top_p, top_k, speculative)
    graphdef, state = nnx.split(model)
    _, decode_fn, draft_fn, verify_fn = _steps(graphdef)
    eos = model.cfg.eos_token_id
    logits, streams, cache = prefill(model, prompts, max_len, prefill_chunk, with_mtp=speculative)
    key = jax.random.key(seed)
    sampling = (bool(greedy), float(temperature), float(top_p), int(top_k))
    token = sample(logits, jax.random.fold_in(key, 0), greedy=greedy, temperature=temperature, top_p=top_p,
                   top_k=top_k)
    emitted = np.zeros(len(prompts), np.int64)
    done = np.zeros(len(prompts), bool)

    def take(new: list[list[int]]) -> list[list[int]]:
        out = []
        for i, toks in enumerate(new):
            keep = []
            for t in toks:
                if done[i] or emitted[i] >= max_new_tokens:
                    break
                keep.append(int(t))
                emitted[i] += 1
                done[i] = t == eos or emitted[i] >= max_new_tokens
            out.append(keep)
        return out

    yield take([[t] for t in np.asarray(token)])
    if speculative:
        drafted, cache = draft_fn(state, cache, streams, token, cache["length"] - 1)
        while not done.all():
            greedy_tokens, count, drafted, cache = verify_fn(state, cache, token, drafted)
            greedy_tokens, count = np.asarray(greedy_tokens), np.asarray(count)
            if stats is not None:
                stats["drafts"] = stats.get("drafts", 0) + int((~done).sum())
                stats["accepted"] = stats.get("accepted", 0) + int(((count == 2) & ~done).sum())
            token = jnp.asarray(greedy_tokens[np.arange(len(prompts)), count - 1])
            yield take([list(g[:c]) for g, c in zip(greedy_tokens, count)])
        return
    step = 0
    while not done.all():
        step += 1
        token, _, cache = decode_fn(state, cache, token, jax.random.fold_in(key, step), sampling=sampling)
        yield take([[t] for t in np.asarray(token)])


def generate(model: DeepseekV4, prompts, max_new_tokens: int = 32, *, greedy: bool = True,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, top_k: int = 0, seed: int = 0,
             speculative: bool = False, max_len: int | None = None, prefill_chunk: int = 64,
             on_step: Callable[[list[list[int]]], None] | None = None, stats: dict | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt (token-id lists), up to `max_new_tokens`, stopping after EOS (kept).

    greedy: argmax (then temperature / top_p / top_k are unused); else sampled with `seed`. speculative: MTP
    drafts verified by the main model (greedy only; the same output as without). max_len: the cache size in
    tokens (default: the longest prompt plus max_new_tokens); a longer request is a ValueError. on_step: called
    with each step's new tokens per prompt (for streaming). stats: see `stream`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for new in stream(model, prompts, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                      top_k=top_k, seed=seed, speculative=speculative, max_len=max_len, prefill_chunk=prefill_chunk,
                      stats=stats):
        for o, t in zip(out, new):
            o.extend(t)
        if on_step is not None:
            on_step(new)
    return out
