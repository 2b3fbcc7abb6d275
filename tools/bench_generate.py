r"""Generation speed: ours (deepseek_v4.inference) against transformers' `generate` with its V4 cache.

    python -m tools.bench_generate                       # tiny, prompt 64, 64 new tokens, batch 1 and 8
    python -m tools.bench_generate --prefill_lengths=64,256,1024 --notorch

Both sides load the same weights (our model exported with `interop.to_hf`), float32, greedy. Decode tokens/s
are measured as (tokens of a run with N new tokens - of a run with 1) / time difference, so prefill and the
first step's compilation are excluded; each side first runs once untimed. Cache bytes: ours is the fixed-size
cache for prompt + N tokens (main layers), transformers' the tensors its cache holds after the run. Prefill:
time to fill the cache from prompts of each length (ours chunked, --prefill_chunk tokens at a time). The greedy
tokens of both sides are compared. Prints a table (and `--json` a JSON line).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, interop, inference
from tools import timing

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("config", "tiny", "Config preset.")
    flags.DEFINE_integer("prompt_len", 64, "Prompt tokens of the decode benchmark.")
    flags.DEFINE_integer("new_tokens", 64, "New tokens of the decode benchmark.")
    flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes of the decode benchmark.")
    flags.DEFINE_list("prefill_lengths", ["64", "128", "256", "512", "1024"], "Prompt lengths of the prefill timing.")
    flags.DEFINE_integer("prefill_chunk", 256, "Our prefill chunk.")
    flags.DEFINE_integer("repeats", 2, "Timed repetitions (the best is kept).")
    flags.DEFINE_bool("torch", True, "Also run transformers.")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for transformers (0: torch's default).")
    flags.DEFINE_bool("json", False, "Also print the results as one JSON line.")
    flags.DEFINE_string("acceptance_workdir", None, "Instead of the speed benchmark: the MTP draft acceptance of this "
                        "run's newest checkpoint on Shakespeare validation prompts (raw text).")
    flags.DEFINE_integer("acceptance_prompts", 8, "Prompts of the acceptance measurement.")


def _best(fn, repeats):
    """The fastest of `repeats` calls (no warm-up call: the first compiles, the later ones are the best)."""
    return timing.time_calls(fn, repeats, warmup=0).best_s


class Ours:
    def __init__(self, model: DeepseekV4):
        self.model = model

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        out = inference.generate(self.model, prompts.tolist(), max_new_tokens=new, greedy=True,
                                 max_len=prompts.shape[1] + FLAGS.new_tokens, prefill_chunk=FLAGS.prefill_chunk)
        return np.asarray([o + [-1] * (new - len(o)) for o in out])

    def prefill(self, prompts: np.ndarray) -> None:
        logits, _, _ = inference.prefill(self.model, prompts.tolist(), prompts.shape[1], FLAGS.prefill_chunk)
        logits.block_until_ready()

    def cache_bytes(self, batch: int, length: int) -> int:
        return inference.cache_bytes(jax.eval_shape(lambda: inference.init_cache(self.model, batch, length)))


class Theirs:
    def __init__(self, model: DeepseekV4, directory: str):
        import safetensors.torch
        import torch
        import transformers

        self.torch = torch
        if FLAGS.torch_threads:
            torch.set_num_threads(FLAGS.torch_threads)
        config_dict, state_dict = interop.to_hf(model)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config_dict, f)
        tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}
        safetensors.torch.save_file(tensors, os.path.join(directory, "model.safetensors"))
        self.model = transformers.DeepseekV4ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.last = None

    def generate(self, prompts: np.ndarray, new: int) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model.generate(self.torch.from_numpy(prompts.astype(np.int64)), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                                      pad_token_id=0)
        self.last = out.past_key_values
        return out.sequences[:, prompts.shape[1]:].numpy()

    def prefill(self, prompts: np.ndarray) -> None:
        with self.torch.no_grad():
            self.model(self.torch.from_numpy(prompts.astype(np.int64)), use_cache=True)

    def cache_bytes(self) -> int:
        seen, total = set(), 0

        def add(x):
            nonlocal total
            if isinstance(x, self.torch.Tensor):
                if x.data_ptr() not in seen:
                    seen.add(x.data_ptr())
                    total += x.numel() * x.element_size()
            elif isinstance(x, dict):
                for v in x.values():
                    add(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    add(v)

        for layer in getattr(self.last, "layers", []):
            for v in vars(layer).values():
                add(v)
        return total


def decode_rate(side, prompts: np.ndarray, new: int, repeats: int) -> tuple[float, np.ndarray]:
    tokens = side.generate(prompts, new)  # warm-up (compiles)
    side.generate(prompts, 1)
    t_new = _best(lambda: side.generate(prompts, new), repeats)
    t_one = _best(lambda: side.generate(prompts, 1), repeats)
    return prompts.shape[0] * (new - 1) / max(t_new - t_one, 1e-9), tokens


def acceptance(workdir: str, n_prompts: int, prompt_len: int, new: int) -> dict:
    """Speculative decoding on a trained checkpoint: draft acceptance, against two baselines and 1 / vocab."""
    from deepseek_v4.corpus.shakespeare import source_files
    from deepseek_v4.tokenizer import BOS_ID, get_tokenizer
    from experiments.generate import load_checkpoint

    model, source = load_checkpoint(workdir)
    with open(source_files()["validation"][0], encoding="utf-8") as f:
        ids = get_tokenizer().encode(f.read()).tolist()
    stride = (len(ids) - prompt_len) // n_prompts
    prompts = [[BOS_ID] + ids[i * stride: i * stride + prompt_len] for i in range(n_prompts)]
    stats: dict = {}
    t0 = time.perf_counter()
    spec = inference.generate(model, prompts, new, speculative=True, stats=stats)
    t_spec = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = inference.generate(model, prompts, new)
    t_plain = time.perf_counter() - t0
    pairs = [(a, b) for out in plain for a, b in zip(out, out[1:])]
    tokens = [t for out in plain for t in out]
    top = max(set(tokens), key=tokens.count)
    return {"source": source, "identical_to_greedy": spec == plain, "drafts": stats["drafts"],
            "accepted": stats["accepted"], "acceptance": stats["accepted"] / stats["drafts"],
            "baseline_repeat_previous": sum(a == b for a, b in pairs) / len(pairs),
            "baseline_most_frequent": tokens.count(top) / len(tokens), "chance": 1 / model.cfg.vocab_size,
            "tokens_per_verify_call": 1 + stats["accepted"] / stats["drafts"],
            "seconds_speculative": t_spec, "seconds_plain": t_plain}


def main(argv):
    del argv
    if FLAGS.acceptance_workdir:
        print(json.dumps(acceptance(FLAGS.acceptance_workdir, FLAGS.acceptance_prompts, FLAGS.prompt_len,
                                    FLAGS.new_tokens), indent=1))
        return
    cfg = get_config(FLAGS.config, dtype="float32", param_dtype="float32")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    ours = Ours(model)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        theirs = Theirs(model, d) if FLAGS.torch else None
        for b in (int(x) for x in FLAGS.batch_sizes):
            prompts = rng.integers(2, cfg.vocab_size, (b, FLAGS.prompt_len))
            rate, tokens = decode_rate(ours, prompts, FLAGS.new_tokens, FLAGS.repeats)
            row = {"batch": b, "ours_tok_s": rate,
                   "ours_cache_bytes": ours.cache_bytes(b, FLAGS.prompt_len + FLAGS.new_tokens)}
            if theirs is not None:
                their_rate, their_tokens = decode_rate(theirs, prompts, FLAGS.new_tokens, FLAGS.repeats)
                theirs.generate(prompts, FLAGS.new_tokens)
                row.update(hf_tok_s=their_rate, hf_cache_bytes=theirs.cache_bytes(),
                           same_tokens=float(np.mean(tokens == their_tokens)), speedup=rate / their_rate)
            rows.append(row)
        prefill = []
        for n in (int(x) for x in FLAGS.prefill_lengths):
            prompts = rng.integers(2, cfg.vocab_size, (1, n))
            ours.prefill(prompts)
            row = {"prompt_len": n, "ours_s": _best(lambda: ours.prefill(prompts), FLAGS.repeats)}
            if theirs is not None:
                theirs.prefill(prompts)
                row["hf_s"] = _best(lambda: theirs.prefill(prompts), FLAGS.repeats)
            prefill.append(row)
    print(f"config {FLAGS.config} (float32), prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, greedy, "
          f"backend {jax.default_backend()}")
    print("| batch | ours tok/s | transformers tok/s | speedup | ours cache | transformers cache | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours_tok_s']:.1f} | {r.get('hf_tok_s', float('nan')):.1f} | "
              f"{r.get('speedup', float('nan')):.2f}x | {r['ours_cache_bytes'] / 1024:.0f} KiB | "
              f"{r.get('hf_cache_bytes', 0) / 1024:.0f} KiB | {r.get('same_tokens', float('nan')):.2f} |")
    print("\n| prompt | ours prefill s | ms/token | transformers prefill s | ms/token |")
    print("|---|---|---|---|---|")
    for r in prefill:
        hf = r.get("hf_s", float("nan"))
        print(f"| {r['prompt_len']} | {r['ours_s']:.3f} | {1e3 * r['ours_s'] / r['prompt_len']:.2f} | {hf:.3f} | "
              f"{1e3 * hf / r['prompt_len']:.2f} |")
    if FLAGS.json:
        print(json.dumps({"decode": rows, "prefill": prefill}))
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    app.run(main)
