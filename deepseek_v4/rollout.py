"""RL rollouts from the inference cache, with what GRPO's stabilisers need (docs/training.md, "The GRPO loop").

    keys = [sequence_key(seed, step, p, g) for p in range(P) for g in range(G)]
    out = rollout.sample_rollouts(model, prompts, keys, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0)

`inference.generate` stays the plain text generator; this variant returns, per sequence:

  completion   the new tokens (ending with EOS when the model emitted it), as `generate` would sample them
  log_probs    [n] the sampler's log-probability of each new token under the distribution it actually drew from
               (temperature, then the top-k / top-p set renormalised: `inference.sampling_logits`)
  kept_ids     [n, K] the token ids that set kept at each step, K = `kept_width` ("keep sampling mask"; K = 0
               when nothing is cut: temperature only)
  expert_ids   [L, len(prompt) + n - 1, K_experts] each main layer's experts at every position the model read
               (the prompt and every new token but the last), captured while decoding ("keep routing")

Every sequence draws with its own key (`sequence_key`, folded with the position), so a rollout depends on the
weights, the prompt and (seed, step, prompt index, sample index) only, not on the batch it was decoded in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import inference
from deepseek_v4.model import DeepseekV4


def sequence_key(seed: int, step: int, prompt: int, sample: int) -> np.ndarray:
    """The key data ([2] uint32) of one sampled sequence: a function of (seed, step, prompt, sample) only."""
    key = jax.random.key(seed)
    for i in (step, prompt, sample):
        key = jax.random.fold_in(key, i)
    return np.asarray(jax.random.key_data(key))


def kept_width(vocab_size: int, top_p: float, top_k: int) -> int:
    """Ids stored per token for the sampling mask: top_k when set, else the vocabulary under top_p < 1, else 0
    (temperature only: nothing is cut, the mask is the whole vocabulary and is not stored)."""
    if top_k:
        return min(top_k, vocab_size)
    return vocab_size if top_p < 1.0 else 0


def sample_with_log_probs(logits: jax.Array, keys: jax.Array, position: jax.Array, *, temperature: float,
                          top_p: float, top_k: int, kept: int):
    """One draw per row from `inference.sampling_logits`, with its log-probability and the kept ids.

    Args:
      logits: [B, V] float32 raw logits.
      keys: [B, 2] uint32 key data per row (`sequence_key`); the draw uses fold_in(key, position).
      position: [] int32 the index of the new token in its completion.
      kept: `kept_width`.

    Returns:
      tokens [B] int32, log_probs [B] float32 (log_softmax of the processed logits at the token), kept_ids [B, kept]
      int32 (the kept set, most likely first) and kept_valid [B, kept] bool (False past the set's end).
    """
    processed = inference.sampling_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    row_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), position))(keys)
    tokens = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(row_keys, processed).astype(jnp.int32)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tokens[:, None], axis=-1)[:, 0]
    if kept:
        values, ids = jax.lax.top_k(processed, kept)
        return tokens, log_probs, ids.astype(jnp.int32), jnp.isfinite(values)
    b = logits.shape[0]
    return tokens, log_probs, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)


@dataclasses.dataclass
class Rollouts:
    """Sampled completions of a batch of prompts (one entry per prompt, see the module docstring)."""

    completions: list[list[int]]
    log_probs: list[np.ndarray]  # [n_i] float32
    kept_ids: list[np.ndarray]  # [n_i, K] int32
    kept_valid: list[np.ndarray]  # [n_i, K] bool
    expert_ids: list[np.ndarray]  # [L, len(prompt_i) + n_i - 1, K_experts] int32


@functools.lru_cache(maxsize=8)
def _steps(graphdef, sampling: tuple):
    temperature, top_p, top_k, kept = sampling
    draw = functools.partial(sample_with_log_probs, temperature=temperature, top_p=top_p, top_k=top_k, kept=kept)

    def prefill(state, cache, tokens, valid):
        model = nnx.merge(graphdef, state)
        _, hidden, cache, routing = inference.trunk_chunk(model, cache, tokens, valid, with_routing=True)
        rows = jnp.maximum(valid - 1, 0)
        logits = jnp.take_along_axis(hidden, rows[:, None, None], axis=1)[:, 0] @ model.head[...].astype(jnp.float32)
        return logits, routing, {**cache, "length": cache["length"] + valid}

    def decode(state, cache, tokens, keys, position):
        model = nnx.merge(graphdef, state)
        one = jnp.ones_like(cache["length"])
        _, hidden, cache, routing = inference.trunk_chunk(model, cache, tokens[:, None], one, with_routing=True)
        logits = hidden[:, 0] @ model.head[...].astype(jnp.float32)
        return draw(logits, keys, position), routing[:, :, 0], {**cache, "length": cache["length"] + 1}

    return (jax.jit(prefill, donate_argnums=1), jax.jit(decode, donate_argnums=1),
            jax.jit(lambda logits, keys, position: draw(logits, keys, position)))


def sample_rollouts(model: DeepseekV4, prompts: list[list[int]], keys: np.ndarray, *, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, prefill_chunk: int = 64
                    ) -> Rollouts:
    """Sample one completion per prompt with the cache, recording log-probs, kept ids and routing.

    Args:
      prompts: token-id lists (a prompt repeated G times gives a group).
      keys: [len(prompts), 2] uint32 key data, one per sequence (`sequence_key`).
      max_new_tokens: completion budget; a completion stops after EOS.

    Raises:
      ValueError: one line, for empty prompts, bad ids or bad sampling settings.
    """
    vocab = model.cfg.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if any(not 0 <= int(t) < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if max_new_tokens < 1 or not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"need max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{max_new_tokens}, {temperature}, {top_p}, {top_k}")
    keys = np.asarray(keys, np.uint32)
    if keys.shape != (len(prompts), 2):
        raise ValueError(f"need one [2] uint32 key per prompt, got shape {keys.shape}")
    sampling = (float(temperature), float(top_p), int(top_k), kept_width(vocab, top_p, top_k))
    graphdef, state = nnx.split(model)
    prefill_fn, decode_fn, draw_fn = _steps(graphdef, sampling)
    b = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    max_len = -(-(longest + max_new_tokens) // 64) * 64
    chunk = min(prefill_chunk, 1 << (longest - 1).bit_length())
    n_chunks = -(-longest // chunk)
    padded = np.zeros((b, n_chunks * chunk), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    cache = inference.init_cache(model, b, max_len)
    last, prompt_routing = None, []
    for k in range(n_chunks):
        valid = np.clip(lengths - k * chunk, 0, chunk).astype(np.int32)
        logits, routing, cache = prefill_fn(state, cache, padded[:, k * chunk: (k + 1) * chunk], valid)
        ends_here = jnp.asarray((valid > 0) & (k * chunk + valid == lengths))
        last = logits if last is None else jnp.where(ends_here[:, None], logits, last)
        prompt_routing.append(np.asarray(routing))
    prompt_routing = np.concatenate(prompt_routing, axis=2)  # [L, B, n_chunks * chunk, K]
    keys_dev = jnp.asarray(keys)
    drawn = [jax.device_get(draw_fn(last, keys_dev, jnp.int32(0)))]
    decode_routing = []
    eos = model.cfg.eos_token_id
    done = (drawn[0][0] == eos) | (max_new_tokens == 1)
    position = 1
    while not done.all():
        out, routing, cache = decode_fn(state, cache, jnp.asarray(drawn[-1][0]), keys_dev, jnp.int32(position))
        drawn.append(jax.device_get(out))
        decode_routing.append(np.asarray(routing))
        position += 1
        done = done | (drawn[-1][0] == eos) | (position >= max_new_tokens)
    tokens, log_probs, kept_ids, kept_valid = (np.stack([d[j] for d in drawn], axis=1) for j in range(4))
    decode_routing = (np.stack(decode_routing, axis=2) if decode_routing
                      else np.zeros(prompt_routing.shape[:2] + (0,) + prompt_routing.shape[3:], np.int32))
    result = Rollouts([], [], [], [], [])
    for i in range(b):
        stops = np.nonzero(tokens[i] == eos)[0]
        n = int(stops[0]) + 1 if stops.size else tokens.shape[1]
        result.completions.append([int(t) for t in tokens[i, :n]])
        result.log_probs.append(log_probs[i, :n].astype(np.float32))
        result.kept_ids.append(kept_ids[i, :n])
        result.kept_valid.append(kept_valid[i, :n])
        result.expert_ids.append(np.concatenate([prompt_routing[:, i, : lengths[i]],
                                                 decode_routing[:, i, : n - 1]], axis=1).astype(np.int32))
    return result
