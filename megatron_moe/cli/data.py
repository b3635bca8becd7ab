"""`megatron-moe data`: prepare, import and inspect tokenized datasets."""

from __future__ import annotations

import argparse
import json
import time

from megatron_moe.config import ConfigError

DATA_EPILOG = """examples:
  megatron-moe data prepare corpus.jsonl.xz -o data/mycorpus --vocab-size 8192 --workers 2
  megatron-moe data prepare stories.txt.xz -o data/ts --valid-input valid.txt.xz --tokenizer tokenizer.json
  megatron-moe data import /data/megatron/corpus_text_document -o data/imported --tokenizer gpt2
  megatron-moe data inspect data/ts --seq-length 256 --unique-tokens 1000000 --epochs 4
  megatron-moe data inspect                      # the built-in synthetic corpus
  megatron-moe data inspect --corpus tinystories # the built-in real text
"""


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare and inspect tokenized datasets",
        description="Tokenize corpora into megatron-core .bin/.idx datasets and inspect data-reuse schedules.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")

    prep = verbs.add_parser(
        "prepare",
        help="tokenize text / JSON lines into a prepared dataset directory",
        description="Inputs: plain text with documents separated by --separator (default a line\n"
        "<|endoftext|>), JSON lines with a --text-key field, or directories of them; .xz/.gz/.bz2\n"
        "are read directly. The train/validation split is by a hash of each document's text.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("inputs", nargs="+", help="input files or directories")
    prep.add_argument("-o", "--output-dir", "--output", dest="output", required=True,
                      help="output dataset directory (must not exist)")
    prep.add_argument("--tokenizer", help="tokenizer.json (or its directory), a Hugging Face Hub model name, SentencePiece "
                      "*.model or *.tiktoken (default: train a BPE)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="vocab size of a trained BPE (default 8192)")
    prep.add_argument("--eod-token", help="end-of-document token of a loaded tokenizer (default: auto-detect)")
    prep.add_argument("--text-key", default="text", help="JSON field or Parquet column holding the text (default text)")
    prep.add_argument("--separator", default="<|endoftext|>", help="document separator in plain text")
    prep.add_argument("--line-documents", action="store_true", help="plain text: each non-empty line is a document")
    prep.add_argument("--valid-fraction", type=float, default=0.01, help="held-out fraction of documents")
    prep.add_argument("--valid-input", action="append", help="file/dir of validation documents (repeatable)")
    prep.add_argument("--split-seed", type=int, default=0, help="key of the split hash (default 0)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    prep.add_argument("--force", action="store_true", help="replace an existing output directory")
    prep.add_argument("--quiet", action="store_true", help="no progress display")

    prep.set_defaults(func=prepare_main)

    imp = verbs.add_parser(
        "import",
        help="turn a Megatron-LM tokenized dataset (PREFIX.bin/.idx) into a prepared dataset, no re-tokenizing",
        description="Reads a megatron-core indexed dataset written by Megatron-LM's preprocessing (one sequence per "
        "document), appends the end-of-document token where missing, and writes a prepared dataset (manifest, "
        "train/validation split, checksums). --tokenizer must be the one the data was tokenized with.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("prefix", help="Megatron-LM dataset prefix (PREFIX.bin and PREFIX.idx)")
    imp.add_argument("-o", "--output-dir", dest="output", required=True, help="output dataset directory (must not exist)")
    imp.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory or Hub name), *.model, *.tiktoken")
    imp.add_argument("--eod-token", help="end-of-document token of the tokenizer (default: auto-detect)")
    imp.add_argument("--valid-prefix", help="a second Megatron-LM prefix to use as the validation split")
    imp.add_argument("--valid-fraction", type=float, default=0.01, help="held-out fraction when no --valid-prefix")
    imp.add_argument("--split-seed", type=int, default=0, help="key of the split hash (default 0)")
    imp.add_argument("--force", action="store_true", help="replace an existing output directory")
    imp.add_argument("--quiet", action="store_true", help="no progress display")
    imp.set_defaults(func=import_main)

    insp = verbs.add_parser(
        "inspect",
        help="print a dataset's counts and a schedule's tokens, epochs and fingerprint",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    insp.add_argument("path", nargs="?", help="prepared dataset directory (omit for a built-in corpus)")
    insp.add_argument("--corpus", choices=["synthetic", "tinystories"], help="built-in corpus when no path is given")
    insp.add_argument("--config", help="take data, seq_length, global batch and train steps from a run config")
    insp.add_argument("--seq-length", type=int, help="sequence length (default 256)")
    insp.add_argument("--global-batch-size", type=int, help="sequences per step (default 8)")
    insp.add_argument("--train-steps", type=int, help="steps of the run (for consumed tokens when unbounded)")
    insp.add_argument("--seed", type=int, help="data order seed")
    insp.add_argument("--unique-tokens", type=int, help="unique-token budget (0 = all)")
    insp.add_argument("--epochs", type=float, help="passes over the unique tokens")
    insp.add_argument("--consumed-tokens", type=int, help="total tokens of the schedule")
    insp.add_argument("--verify", action="store_true",
                      help="verify every file's sha256 against the manifest and every token id against the vocabulary")
    insp.add_argument("--json", action="store_true", help="print the description as JSON")

    insp.set_defaults(func=inspect_main)


def prepare_main(args: argparse.Namespace) -> int:
    from megatron_moe.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    m = prepare_dataset(
        args.inputs, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, eod_token=args.eod_token,
        text_key=args.text_key, separator=args.separator, line_documents=args.line_documents,
        valid_fraction=args.valid_fraction,
        valid_inputs=args.valid_input or [], split_seed=args.split_seed, workers=args.workers, force=args.force,
        progress=not args.quiet,
    )
    secs = time.perf_counter() - t0
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    print(f"wrote {args.output}: {m['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} valid), "
          f"{m['tokens']:,} tokens, {m['bytes'] / 1e6:.2f} MB, {m['bytes_per_token']:.3f} bytes/token, "
          f"vocab {m['tokenizer']['vocab_size']:,}, {secs:.1f} s ({m['bytes'] / 1e6 / secs:.2f} MB/s)")
    if m["skipped_empty_documents"]:
        print(f"skipped {m['skipped_empty_documents']:,} empty documents")
    return 0


def import_main(args: argparse.Namespace) -> int:
    from megatron_moe.data.interop import import_megatron

    m = import_megatron(args.prefix, args.output, tokenizer=args.tokenizer, eod_token=args.eod_token,
                        valid_prefix=args.valid_prefix, valid_fraction=args.valid_fraction,
                        split_seed=args.split_seed, force=args.force, progress=not args.quiet)
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    print(f"wrote {args.output}: {m['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} valid), "
          f"{m['tokens']:,} tokens, {m['bytes_per_token']:.3f} bytes/token, vocab {m['tokenizer']['vocab_size']:,}")
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import DataConfig, load_run_config
    from megatron_moe.data.source import build_data_source
    from megatron_moe.data.store import verify_dataset

    seq_length, gbs, steps = 256, 8, None
    cfg = DataConfig()
    if args.config:
        run = load_run_config(args.config)
        cfg, seq_length, gbs, steps = run.data, run.model.seq_length, run.train.global_batch_size, run.train.train_steps
    if args.path is not None:
        cfg.path = args.path
    for name in ("corpus", "seed", "unique_tokens", "epochs", "consumed_tokens"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("seq_length", "global_batch_size", "train_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    seq_length = args.seq_length or seq_length
    gbs = args.global_batch_size or gbs
    steps = args.train_steps if args.train_steps is not None else steps
    ds = build_data_source(cfg, seq_length, gbs, steps)
    if args.verify:
        verify_dataset(ds.path, ds.manifest)
    info = ds.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = ds.manifest
    fmt = lambda v: "unbounded" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}"  # noqa: E731
    rows = [
        ("dataset", f"{info['source']} ({ds.path})" if ds.builtin else info["source"]),
        ("tokenizer", f"{m['tokenizer']['kind']}, vocab {ds.vocab_size:,}, eod {ds.eod_id}, "
                      f"sha256 {m['tokenizer']['sha256'][:12]}"),
        ("documents", f"{m['documents']:,} ({info['train_documents']:,} train, {info['valid_documents']:,} valid)"),
        ("tokens", f"{m['tokens']:,} ({info['train_tokens']:,} train, {info['valid_tokens']:,} valid)"),
        ("bytes/token", f"{ds.bytes_per_token:.4f} (validation split)"),
        ("sequence", f"seq_length {seq_length}, global batch {gbs}, seed {cfg.seed}"),
        ("unique", f"{info['unique_tokens']:,} tokens in {info['unique_documents']:,} documents"
                   + (f" (budget {cfg.unique_tokens:,})" if cfg.unique_tokens else " (all)")),
        ("schedule", f"{fmt(info['schedule_tokens'])} tokens, {fmt(info['schedule_samples'])} samples, "
                     f"{fmt(info['num_steps'])} steps"),
        ("consumed", f"{fmt(info['consumed_tokens'])} tokens" + ("" if steps is None else f" ({steps} train steps)")),
        ("epochs", fmt(info["epochs"])),
        ("fingerprint", info["fingerprint"]),
    ]
    if args.verify:
        rows.append(("checksums", "verified"))
    for k, v in rows:
        print(f"{k:>12}  {v}")
    return 0
