r"""Export a training checkpoint as official DeepSeek-V4 safetensors (bf16, fp8, or fp4 experts).

    python -m tools.export_safetensors --workdir=runs/tiny --out=export/tiny --format=bf16 [--step=N]

Writes `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` with the official tensor names,
`config.json` (published fields; for fp8/fp4 the `quantization_config` of the official releases),
`generation_config.json` and the tokenizer files. Formats (docs/checkpoints.md):
  bf16  every linear in BF16 (norms, embedding, head BF16; hc_*, ape, attn_sink, gate.bias FP32; tid2eid I64)
  fp8   attention / shared-expert / routed-expert linears FP8 E4M3 with 128x128 UE8M0 block scales
  fp4   as fp8, routed experts MXFP4 (int8, two E2M1 values per byte, 1x32 UE8M0 scales), like the instruct release
The checkpoint is read one array slice at a time and each tensor is written as soon as it is converted,
so memory stays a small multiple of the largest tensor. The output appears atomically (written to a
temporary directory, then renamed); an existing non-empty --out is only replaced with --overwrite.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time

from absl import app, flags
from absl import logging as absl_logging
from tqdm import tqdm

from deepseek_v4 import export, safetensors_files, tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_string("workdir", None, "Run directory of experiments.pretrain (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_enum("format", "bf16", list(export.FORMATS), "Weight format.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
    flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file, in GB (1e9 bytes).")
    flags.DEFINE_integer("read_mb", 64, "Checkpoint bytes read at once (one item at least).", lower_bound=1)
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["workdir", "out"])


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out={out} is not empty; pass --overwrite to replace it")


def _publish(tmp: str, out: str) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)


def export_run(workdir: str, out: str, fmt: str, *, step: int | None = None, overwrite: bool = False,
               max_shard_bytes: int = 5 * 10**9, read_bytes: int = 64 << 20, progress: bool = True) -> dict:
    """Export one checkpoint of `workdir` to `out`; returns a summary (step, bytes, seconds, peak RSS).

    Raises:
      ValueError: bad workdir/step/output, a checkpoint that does not match its config, NaN/inf weights.
    """
    out = os.path.abspath(out)
    _check_out(out, overwrite)
    step, cfg, reader = export.open_checkpoint(workdir, step)
    tensors = export.plan(cfg, fmt)
    export.check_state(reader, tensors, cfg)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary, readable directory
    try:
        writer = safetensors_files.SafetensorsWriter(tmp, export.stored_tensors(tensors), max_shard_bytes)
        bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc=f"export {fmt} step {step}",
                   disable=not progress, file=sys.stderr)
        for name, array in export.iter_tensors(reader, tensors, read_bytes):
            writer.write(name, array)
            bar.update(array.nbytes)
        bar.close()
        writer.close()
        _write_json(os.path.join(tmp, "config.json"), export.hf_config(cfg, fmt))
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
            "temperature": 1.0, "top_p": 1.0})
        tok_json = tokenizer.tokenizer_json_path()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(os.path.dirname(tok_json), name), os.path.join(tmp, name))
        _check_out(out, overwrite)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    return {"step": step, "format": fmt, "tensors": sum(len(t.stored()) for t in tensors),
            "files": len(writer.files), "bytes": writer.total_bytes, "seconds": seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_start_bytes": rss_start}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax logs every array it opens at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        s = export_run(FLAGS.workdir, FLAGS.out, FLAGS.format, step=FLAGS.step, overwrite=FLAGS.overwrite,
                       max_shard_bytes=int(FLAGS.max_shard_gb * 1e9), read_bytes=FLAGS.read_mb << 20,
                       progress=FLAGS.progress)
    except (ValueError, OSError) as e:
        sys.exit(f"export_safetensors: error: {e}")
    except KeyboardInterrupt:
        sys.exit("export_safetensors: interrupted; --out was not touched")
    print(f"exported step {s['step']} ({s['format']}): {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB in "
          f"{s['files']} file(s) -> {os.path.abspath(FLAGS.out)} in {s['seconds']:.1f} s "
          f"({s['bytes'] / 1e6 / max(s['seconds'], 1e-9):.1f} MB/s); peak RSS {s['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({s['rss_start_bytes'] / 1e9:.2f} GB before the export)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
