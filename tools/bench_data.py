#!/usr/bin/env python
"""Benchmark the data layer: preprocessing throughput (MB/s of UTF-8 text) and batch assembly.

    python tools/bench_data.py                          # ~8 MB of synthetic stories
    python tools/bench_data.py --input corpus.txt.xz --workers 1 2
    python tools/bench_data.py --mb 4 --vocab-size 2048

Stages timed separately (imports excluded): BPE training on the corpus, then tokenize + write .bin/.idx
with a fixed tokenizer for each worker count, then `train_batch` throughput of the schedule.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="corpus file or directory (default: synthetic stories)")
    ap.add_argument("--mb", type=float, default=8.0, help="size of the synthetic corpus in MB (default 8)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab size (default 4096)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    args = ap.parse_args()

    from megatron_moe.config import DataConfig
    from megatron_moe.data.prepare import prepare_dataset
    from megatron_moe.data.source import DataSource
    from megatron_moe.data.synthetic import synthetic_story

    with warnings.catch_warnings():  # import torch + megatron-core now so it is not timed
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp_path = Path(tmp)
        if args.input:
            corpus = Path(args.input)
        else:
            corpus = tmp_path / "corpus.txt"
            parts, size, i = [], 0, 0
            while size < args.mb * 1e6:
                story = synthetic_story(i)
                parts.append(story + "\n<|endoftext|>\n")
                size, i = size + len(story) + 15, i + 1
            corpus.write_text("".join(parts))

        t0 = time.perf_counter()
        m = prepare_dataset([corpus], tmp_path / "trained", vocab_size=args.vocab_size, progress=False)
        t_train = time.perf_counter() - t0
        mb = m["bytes"] / 1e6
        print(f"corpus: {m['documents']:,} documents, {mb:.2f} MB of text, {m['tokens']:,} tokens, "
              f"{m['bytes_per_token']:.3f} bytes/token")
        print(f"train BPE (vocab {args.vocab_size}) + tokenize + write: {t_train:.2f} s, {mb / t_train:.2f} MB/s")
        tok = tmp_path / "trained" / "tokenizer.json"
        for w in args.workers:
            t0 = time.perf_counter()
            prepare_dataset([corpus], tmp_path / f"w{w}", tokenizer=tok, workers=w, progress=False)
            secs = time.perf_counter() - t0
            print(f"tokenize + write, given tokenizer, {w} worker(s): {secs:.2f} s, {mb / secs:.2f} MB/s")

        ds = DataSource(tmp_path / "trained", DataConfig(epochs=4), 1024, 64)
        steps = min(ds.num_steps or 0, 200)
        t0 = time.perf_counter()
        for s in range(steps):
            ds.train_batch(s)
        secs = time.perf_counter() - t0
        print(f"train_batch (64 x 1025): {steps} steps in {secs:.3f} s, "
              f"{steps * 64 * 1024 / max(secs, 1e-9) / 1e6:.1f} M tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
