"""The built-in corpora, used when `data.path` is empty: prepared once per machine into a cache directory, so
the main job and the tests need no download.

- `tinystories`: 10,270 real TinyStories stories shipped with the package (`data/text/`, CDLA-Sharing-1.0;
  see the README there), 3% of them held out for validation by a hash of their text.
- `synthetic`: templated stories (`data.synthetic`), for tests and pipeline checks.

Each is tokenized with a byte-level BPE of `data.corpus_vocab_size` trained on its training split. The same
settings give the same bytes on every machine; concurrent builders race harmlessly (the first rename wins and
the others' results are identical).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from megatron_moe.config import ConfigError, DataConfig
from megatron_moe.data.inputs import Document, iter_documents
from megatron_moe.data.prepare import temp_dir_for, text_split_value, write_dataset
from megatron_moe.data.store import MANIFEST
from megatron_moe.data.synthetic import SYNTHETIC_VERSION, synthetic_documents, synthetic_story
from megatron_moe.data.tokenizers import EOD_TEXT

DEFAULT_VOCAB_SIZE = {"synthetic": 512, "tinystories": 4096}
SYNTHETIC_VALID_FRACTION = 0.1
TINYSTORIES_FILE = Path(__file__).parent / "text" / "tinystories.txt.xz"
TINYSTORIES_VERSION = 1  # bump when the shipped text or its split changes
TINYSTORIES_VALID_FRACTION = 0.03  # ~300 stories, ~70k tokens at the default vocabulary


def cache_root() -> Path:
    """Cache directory: $MEGATRON_MOE_CACHE, else ~/.cache/megatron_moe (a temp dir if home is read-only)."""
    if env := os.environ.get("MEGATRON_MOE_CACHE"):
        return Path(env)
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron_moe"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"megatron_moe-cache-{os.getuid()}"


def _cached(out: Path, write: Callable[[Path], None]) -> Path:
    """`out` if it holds a prepared dataset, else `write(tmp)` into a fresh sibling and rename it to `out`."""
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    try:
        write(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / MANIFEST).is_file():  # lost a race to another builder: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def synthetic_dataset(num_documents: int = 2000, vocab_size: int = 512, root: Path | None = None) -> Path:
    """The prepared synthetic corpus of `num_documents` stories, split 90/10 by text hash."""
    docs = synthetic_documents(num_documents)
    if not any(text_split_value(t, 0) < SYNTHETIC_VALID_FRACTION for t in docs):
        first = next(i for i in itertools.count(num_documents)
                     if text_split_value(synthetic_story(i), 0) < SYNTHETIC_VALID_FRACTION)
        raise ConfigError(f"data.synthetic_documents = {num_documents} leaves the synthetic corpus no validation "
                          f"documents; use >= {first + 1}")

    def source() -> Iterator[tuple[Document, str | None]]:
        return ((Document(t, f"synthetic:{i}"), None) for i, t in enumerate(docs))

    def write(tmp: Path) -> None:
        write_dataset(
            source, tmp, tokenizer_file=None, vocab_size=vocab_size, eod_token=None,
            valid_fraction=SYNTHETIC_VALID_FRACTION, split_seed=0, workers=1, progress=False,
            extra={"inputs": [{"path": f"synthetic:v{SYNTHETIC_VERSION}", "documents": num_documents}],
                   "valid_inputs": []},
        )

    root = Path(root) if root else cache_root()
    return _cached(root / f"synthetic-v{SYNTHETIC_VERSION}-docs{num_documents}-vocab{vocab_size}", write)


def tinystories_dataset(vocab_size: int = 4096, root: Path | None = None, progress: bool = True) -> Path:
    """The prepared built-in TinyStories corpus (built on first use: BPE training and tokenizing take seconds)."""
    root = Path(root) if root else cache_root()
    out = root / f"tinystories-v{TINYSTORIES_VERSION}-vocab{vocab_size}"

    def source() -> Iterator[tuple[Document, str | None]]:
        return ((d, None) for d in iter_documents(TINYSTORIES_FILE, EOD_TEXT))

    def write(tmp: Path) -> None:
        if progress:
            print(f"preparing the built-in TinyStories corpus (BPE vocabulary {vocab_size:,}) into {out}; "
                  "once per machine", file=sys.stderr, flush=True)
        write_dataset(
            source, tmp, tokenizer_file=None, vocab_size=vocab_size, eod_token=None,
            valid_fraction=TINYSTORIES_VALID_FRACTION, split_seed=0, workers=1, progress=progress,
            extra={"inputs": [{"path": f"builtin:tinystories:v{TINYSTORIES_VERSION}"}], "valid_inputs": []},
        )

    return _cached(out, write)


def corpus_dataset(cfg: DataConfig) -> Path:
    """The prepared dataset of the built-in corpus `cfg.corpus`."""
    vocab = cfg.corpus_vocab_size or DEFAULT_VOCAB_SIZE[cfg.corpus]
    if cfg.corpus == "tinystories":
        return tinystories_dataset(vocab)
    return synthetic_dataset(cfg.synthetic_documents, vocab)
