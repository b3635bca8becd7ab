"""The data layer: from raw text to the exact token stream every arm of a study trains on.

- `tokenizers`: Hugging Face, SentencePiece and tiktoken tokenizers behind one interface; BPE training.
- `inputs`: reading raw corpora (text, JSON lines, compressed).
- `prepare`: tokenizing a corpus into a prepared dataset (megatron-core `.bin`/`.idx` + manifest).
- `store`: a prepared dataset on disk: manifest checks and the indexed-dataset reader.
- `corpora`: the built-in corpora (TinyStories text shipped in `text/`, and the synthetic one), prepared into
  the cache on first use.
- `synthetic`: the generator of the synthetic corpus.
- `interop`: Megatron-LM datasets imported without re-tokenizing.
- `schedule`: data-reuse schedules (unique-token budget x epochs) as a pure function of the data and seed.
- `source`: what the trainer reads: the batches of each step, validation batches, the stream fingerprint.

Heavy imports (torch via megatron-core's builder, `tokenizers`) happen inside functions.
"""
