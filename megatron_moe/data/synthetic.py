"""The built-in synthetic corpus: templated children's stories, prepared once per machine into a cache
directory, so the main job and the tests need no download.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_moe.config import ConfigError
from megatron_moe.data.inputs import Document
from megatron_moe.data.prepare import text_split_value, write_dataset
from megatron_moe.data.store import MANIFEST


SYNTHETIC_VERSION = 1


# ================================================================ the built-in synthetic corpus

_NAMES = [("Lily", "she"), ("Tom", "he"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Anna", "she"),
          ("Max", "he"), ("Lucy", "she"), ("Tim", "he"), ("Sue", "she"), ("Jack", "he"), ("Emma", "she"),
          ("Leo", "he"), ("Zoe", "she"), ("Finn", "he"), ("Ella", "she")]


_ANIMALS = ["cat", "dog", "bird", "frog", "rabbit", "duck", "bear", "fox", "mouse", "pig", "lion", "owl"]


_OBJECTS = ["ball", "kite", "box", "hat", "cake", "book", "car", "boat", "apple", "flower", "key", "drum",
            "shell", "cup", "toy", "stick"]


_ADJS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "old", "new", "pretty", "funny"]


_PLACES = ["park", "garden", "forest", "house", "beach", "farm", "school", "town", "field", "hill"]


_SPOTS = ["tree", "rock", "pond", "bench", "door", "fence", "river", "bush"]


_FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "surprised", "angry"]


_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]


_FOODS = ["soup", "bread", "cookies", "milk", "pie", "fruit"]


def synthetic_story(index: int) -> str:
    """Story number `index` of the synthetic corpus: templated, with names and objects that recur within it."""
    r = random.Random(SYNTHETIC_VERSION * 1_000_003 + index)
    (a, pa), (b, pb) = r.sample(_NAMES, 2)
    animal, obj, adj, place, spot = (r.choice(x) for x in (_ANIMALS, _OBJECTS, _ADJS, _PLACES, _SPOTS))
    feel, feel2, weather, food = r.choice(_FEELINGS), r.choice(_FEELINGS), r.choice(_WEATHER), r.choice(_FOODS)
    cap = str.capitalize
    opening = r.choice([
        f"Once upon a time, there was a little {animal} named {a}.",
        f"One {weather} day, a {animal} named {a} went to the {place}.",
        f"{a} was a {adj} {animal} who lived near the {place}.",
    ])
    s = [opening, f"{cap(pa)} had a friend named {b}."]
    s.append(r.choice([
        f"One day, {a} found a {adj} {obj} under the {spot}.",
        f"{a} saw a {adj} {obj} next to the {spot}.",
        f"In the {place}, {a} found a {adj} {obj}.",
    ]))
    s.append(r.choice([
        f'"{b}, look at my {obj}!" said {a}.',
        f"{a} showed the {obj} to {b}.",
        f'"What a {adj} {obj}!" said {b}.',
    ]))
    s.append(f"{b} was {feel}.")
    for _ in range(r.randint(1, 3)):
        s.append(r.choice([
            f"They played with the {obj} by the {spot}.",
            f"{a} and {b} ran to the {spot} with the {obj}.",
            f"{cap(pb)} wanted to hold the {obj} too.",
            f"{a} gave the {obj} to {b}, and {pb} smiled.",
            f"Then the {obj} fell into the {spot}, and {a} was {feel2}.",
            f"They ate {food} in the {place} and talked about the {obj}.",
        ]))
    s.append(r.choice([
        f"At the end of the day, {a} and {b} went home. {cap(pa)} was {feel2}.",
        f"From that day on, {a} and {b} shared the {obj}.",
        f"{a} learned that it is good to share. The end.",
        f"{b} said, \"Thank you, {a}.\" They were friends forever.",
    ]))
    return " ".join(s)


def synthetic_documents(num_documents: int) -> list[str]:
    """The synthetic corpus: `synthetic_story(i)` for i < num_documents."""
    return [synthetic_story(i) for i in range(num_documents)]


SYNTHETIC_VALID_FRACTION = 0.1


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


def synthetic_dataset(num_documents: int = 2000, vocab_size: int = 512, root: Path | None = None) -> Path:
    """Build (once, cached atomically) and return the prepared synthetic dataset directory.

    The corpus is `num_documents` tiny templated English stories (16 names, a few dozen nouns, verbs and
    adjectives; names and objects recur within a story, so a small model's loss falls quickly), split
    90/10 by text hash, with a byte-level BPE of `vocab_size` trained on the training stories. The same
    arguments give the same bytes on every machine; concurrent builders (ranks) race harmlessly.
    """
    root = Path(root) if root else cache_root()
    out = root / f"synthetic-v{SYNTHETIC_VERSION}-docs{num_documents}-vocab{vocab_size}"
    if (out / MANIFEST).is_file():
        return out
    docs = synthetic_documents(num_documents)
    if not any(text_split_value(t, 0) < SYNTHETIC_VALID_FRACTION for t in docs):
        first = next(i for i in itertools.count(num_documents)
                     if text_split_value(synthetic_story(i), 0) < SYNTHETIC_VALID_FRACTION)
        raise ConfigError(f"data.synthetic_documents = {num_documents} leaves the synthetic corpus no validation "
                          f"documents; use >= {first + 1}")
    root.mkdir(parents=True, exist_ok=True)

    def source() -> Iterator[tuple[Document, str | None]]:
        return ((Document(t, f"synthetic:{i}"), None) for i, t in enumerate(docs))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
    try:
        write_dataset(
            source, tmp, tokenizer_file=None, vocab_size=vocab_size, eod_token=None,
            valid_fraction=SYNTHETIC_VALID_FRACTION, split_seed=0, workers=1, progress=False,
            extra={"inputs": [{"path": f"synthetic:v{SYNTHETIC_VERSION}", "documents": num_documents}],
                   "valid_inputs": []},
        )
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / MANIFEST).is_file():  # lost a race to another builder: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
