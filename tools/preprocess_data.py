#!/usr/bin/env python
"""Tokenize a corpus into a megatron-core .bin/.idx dataset: a thin wrapper of `megatron-moe data prepare`.

    python tools/preprocess_data.py corpus.jsonl.xz -o data/corpus --vocab-size 8192 --workers 2
    python tools/preprocess_data.py stories.txt -o data/stories --tokenizer tokenizer.json
    python tools/preprocess_data.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_moe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
