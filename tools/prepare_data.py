"""Tokenize raw documents into ArrayRecord shards that the training loader reads.

    python -m tools.prepare_data --input=PATH[,PATH...] --output=DIR [--format=txt|jsonl|parquet]
        [--text_field=text] [--num_shards=8] [--workers=1]

A txt file is one document; jsonl has one JSON object per line (text under --text_field); parquet has one
row per document (column --text_field, needs pyarrow). Directories contribute their files of a known
extension. Invalid UTF-8 is replaced and counted, empty documents are skipped and counted, and the
manifest is written last, so an interrupted run never leaves a manifest pointing at partial shards.
"""

from __future__ import annotations

import sys

from absl import app, flags

from deepseek_v4.corpus import prepare


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_list("input", None, "Input files or directories, comma-separated.")
    flags.DEFINE_string("output", None, "Output directory (created if needed).")
    flags.DEFINE_enum("format", None, list(prepare.FORMATS), "Input format; default: from each extension.")
    flags.DEFINE_string("text_field", "text", "jsonl key / parquet column holding the text.")
    flags.DEFINE_integer("num_shards", 8, "At most this many ArrayRecord shards.", lower_bound=1)
    flags.DEFINE_integer("workers", 1, "Tokenizer processes (1 = in this process).", lower_bound=1)
    flags.mark_flags_as_required(["input", "output"])


def summary(manifest: dict, output: str) -> str:
    """The one-paragraph report printed at the end."""
    stats = manifest["read_stats"]
    seconds = max(manifest["seconds"], 1e-9)
    return (
        f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"in {len(manifest['shards'])} shard(s) -> {output} "
        f"({seconds:.1f} s, {manifest['tokens'] / seconds:,.0f} tokens/s)\n"
        f"skipped {stats['empty_skipped']:,} empty document(s) and {stats['malformed_records']:,} malformed "
        f"record(s); replaced {stats['replaced_bytes']:,} invalid UTF-8 byte(s); "
        f"longest document {manifest['max_document_tokens']:,} tokens; tokenizer {manifest['tokenizer']}"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        manifest = prepare.prepare(
            FLAGS.input,
            FLAGS.output,
            fmt=FLAGS.format,
            text_field=FLAGS.text_field,
            num_shards=FLAGS.num_shards,
            workers=FLAGS.workers,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"prepare_data: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare_data: interrupted; the output directory keeps its previous manifest (if any)")
    print(summary(manifest, FLAGS.output))


if __name__ == "__main__":
    define_flags()
    app.run(main)
