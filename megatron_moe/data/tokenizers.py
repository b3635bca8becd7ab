"""Tokenizers: Hugging Face `tokenizers` JSON, SentencePiece and tiktoken files behind one small interface,
and byte-level BPE training for corpora that bring no tokenizer.

The optional packages (sentencepiece, tiktoken) are imported only when a file of their kind is loaded.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_moe.config import ConfigError


EOD_TEXT = "<|endoftext|>"
"""Default end-of-document token text (also the default document separator of plain-text inputs)."""


class TextTokenizer:
    """A loaded tokenizer: HF `tokenizers` JSON, SentencePiece model, or tiktoken BPE file."""

    kind: str
    vocab_size: int
    eod_id: int
    eod_token: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    kind = "hf"

    def __init__(self, tok: Any, eod_token: str | None) -> None:
        self.tok = tok
        # Special-token text inside a document (say a literal "<|endoftext|>" in a JSON field) is encoded as
        # ordinary text, so the EOD id only ever marks a document end.
        tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        candidates = [eod_token] if eod_token else [EOD_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>"]
        for cand in candidates:
            tid = tok.token_to_id(cand)
            if tid is not None:
                self.eod_id, self.eod_token = tid, cand
                return
        raise ConfigError(
            f"tokenizer has no end-of-document token (tried {', '.join(candidates)}); pass --eod-token"
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use.
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, sp: Any, eod_token: str | None) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        tid = sp.piece_to_id(eod_token) if eod_token else sp.eos_id()
        if tid is None or tid < 0 or (eod_token and sp.id_to_piece(tid) != eod_token):
            raise ConfigError("SentencePiece model has no end-of-document (eos) token; pass --eod-token")
        self.eod_id, self.eod_token = int(tid), sp.id_to_piece(int(tid))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece drops control pieces when decoding; splice the EOD text back in by hand.
        out, cur = [], []
        for i in ids:
            if int(i) == self.eod_id:
                out += [self.sp.decode(cur), self.eod_token]
                cur = []
            else:
                cur.append(int(i))
        return "".join(out + [self.sp.decode(cur)])


# The GPT-4 (cl100k) pre-tokenisation pattern, used for tiktoken files, which do not carry their own.
_TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)


class TiktokenTokenizer(TextTokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, eod_token: str | None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        self.eod_token = eod_token or EOD_TEXT
        self.eod_id = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(
            name=path.stem, pat_str=_TIKTOKEN_PATTERN, mergeable_ranks=ranks,
            special_tokens={self.eod_token: self.eod_id},
        )
        self.vocab_size = self.enc.n_vocab

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def tokenizer_kind(path: Path) -> str:
    """Which loader a tokenizer file needs, from its name."""
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    if name.endswith(".model"):
        return "sentencepiece"
    if name.endswith(".tiktoken"):
        return "tiktoken"
    return "hf"


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def find_tokenizer_file(name: str | Path) -> Path:
    """The tokenizer file `name` stands for: a file, a directory holding tokenizer.json, or the name of a model
    on the Hugging Face Hub (e.g. `gpt2`, `org/model`), whose tokenizer.json is fetched into (or found in) the
    Hub's local cache."""
    path = Path(name)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer directory {str(path)!r} holds no tokenizer.json")
        path = path / "tokenizer.json"
    if path.is_file():
        return path
    if path.exists() or not _HUB_NAME.match(str(name)) or Path(name).suffix in (".json", ".model", ".tiktoken"):
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist")
    from huggingface_hub import constants, hf_hub_download

    try:  # the Hub's local cache first: no network needed for a tokenizer fetched before
        return Path(hf_hub_download(repo_id=str(name), filename="tokenizer.json", local_files_only=True))
    except Exception:  # not cached (each reason its own exception type)
        pass
    unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    if unreachable:
        raise ConfigError(f"tokenizer {str(name)!r} is not a file nor in the Hugging Face cache, and the Hub cannot be "
                          f"reached ({unreachable}): give a local tokenizer.json or a directory holding one, or fetch "
                          f"it where there is a network (`hf download {name} tokenizer.json`) into the cache that "
                          "HF_HOME names here")
    try:
        return Path(hf_hub_download(repo_id=str(name), filename="tokenizer.json"))
    except Exception as exc:  # no such repository, no tokenizer.json in it, a gated model: each its own type
        reason = " ".join(str(exc).split()) or type(exc).__name__
        first = reason.split(". ")[0].rstrip(".")
        raise ConfigError(f"tokenizer {str(name)!r} is not a file, and the Hugging Face Hub tokenizer of that name "
                          f"could not be fetched ({type(exc).__name__}: {first})") from None


def _unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why `endpoint` (an https URL) cannot be reached within `timeout_s`, or None when a TCP connection opens: a
    quick answer where huggingface_hub would retry for half a minute."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or type(exc).__name__}"


def load_tokenizer(path: str | Path, eod_token: str | None = None) -> TextTokenizer:
    """Load a tokenizer: tokenizer.json (or a directory holding one, or a Hub model name), *.model, *.tiktoken."""
    path = find_tokenizer_file(path)
    kind = tokenizer_kind(path)
    try:
        if kind == "sentencepiece":
            try:
                import sentencepiece
            except ImportError:
                raise ConfigError("a SentencePiece tokenizer needs `pip install sentencepiece`") from None
            return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)), eod_token)
        if kind == "tiktoken":
            try:
                import tiktoken  # noqa: F401
            except ImportError:
                raise ConfigError("a tiktoken tokenizer needs `pip install tiktoken`") from None
            return TiktokenTokenizer(path, eod_token)
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(str(path)), eod_token)
    except ConfigError:
        raise
    except Exception as exc:  # each library raises its own types for a bad file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"tokenizer file {str(path)!r} does not load ({msg})") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE (lossless: decode(encode(x)) == x) with `<|endoftext|>` as token 0; `progress` shows
    the tokenizers library's own bars for counting and merging (on a terminal)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ConfigError(f"vocab size {vocab_size} is too small for byte-level BPE; use >= 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TEXT], show_progress=progress and sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, EOD_TEXT)
