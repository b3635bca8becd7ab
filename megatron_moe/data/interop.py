"""Megatron-LM interoperability. A prepared dataset's `train.bin`/`train.idx` are megatron-core indexed datasets
(what Megatron-LM's `--data-path PREFIX` reads). The other way round, `import_megatron` turns a corpus that
Megatron-LM's preprocessing already tokenized (`PREFIX.bin`/`PREFIX.idx`, one sequence per document) into a
prepared dataset without tokenizing again: the tokenizer it was made with is copied in, an end-of-document token
is appended where a document lacks one, and the validation split is taken from a second prefix or held out by
the same text hash `data prepare` uses (the text is decoded for that, and to count bytes per token).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from megatron_moe.config import ConfigError
from megatron_moe.data.prepare import (
    Progress, copy_tokenizer, finish_dataset, publish, split_writers, temp_dir_for, text_split_value, token_dtype,
)
from megatron_moe.data.store import TokenStore


def import_megatron(
    prefix: str | Path,
    output: str | Path,
    *,
    tokenizer: str | Path,
    eod_token: str | None = None,
    valid_prefix: str | Path | None = None,
    valid_fraction: float = 0.01,
    split_seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Import the Megatron-LM indexed dataset `prefix` (and `valid_prefix`) into the prepared dataset `output`."""
    out = Path(output)
    if out.exists() and not force:
        raise ConfigError(f"output {str(out)!r} already exists; pass --force to replace it")
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    sources = [(Path(prefix), TokenStore.open(Path(prefix)), "train" if valid_prefix is not None else None)]
    if valid_prefix is not None:
        sources.append((Path(valid_prefix), TokenStore.open(Path(valid_prefix)), "valid"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    try:
        tok, _, tok_info = copy_tokenizer(tokenizer, eod_token, tmp)
        dtype = token_dtype(tok.vocab_size)
        writers = split_writers(tmp, dtype)
        total_docs = sum(store.num_documents for _, store, _ in sources)
        show = Progress(f"import {out.name}", total_docs, progress, unit="doc")
        done = skipped = 0
        for path, store, forced in sources:
            top = int(store.tokens.max()) if store.num_tokens else 0
            low = int(store.tokens.min()) if store.num_tokens else 0
            if top >= tok.vocab_size or low < 0:
                raise ConfigError(f"token id {top if top >= tok.vocab_size else low} in {path} is outside the "
                                  f"tokenizer's vocabulary [0, {tok.vocab_size}); pass the tokenizer the data was made with")
            for i in range(store.num_documents):
                ids = np.asarray(store.document(i), dtype=np.int64)
                if len(ids) and ids[-1] == tok.eod_id:
                    ids = ids[:-1]
                done += 1
                if not len(ids):  # an empty document, as data prepare skips them
                    skipped += 1
                    continue
                text = tok.decode(ids)
                is_valid = forced == "valid" if forced else text_split_value(text, split_seed) < valid_fraction
                writers["valid" if is_valid else "train"].add(np.append(ids, tok.eod_id), len(text.encode("utf-8")))
                show.update(done, done, sum(w.tokens for w in writers.values()))
        for w in writers.values():
            w.builder.finalize(str(tmp / f"{w.prefix.name}.idx"))
        show.close(done, sum(w.bytes for w in writers.values()), sum(w.tokens for w in writers.values()))
        split = ({"method": "from --valid-prefix", "valid_prefix": str(valid_prefix)} if valid_prefix is not None else
                 {"method": "blake2b(document text, key=seed) < valid_fraction", "valid_fraction": valid_fraction,
                  "seed": split_seed})
        manifest = finish_dataset(tmp, writers, dtype, tok_info, split, {
            "skipped_empty_documents": skipped,
            "inputs": [{"path": str(Path(prefix)), "format": "megatron-lm"}],
            "valid_inputs": [{"path": str(Path(valid_prefix)), "format": "megatron-lm"}] if valid_prefix else [],
        })
        publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
