"""The synthetic corpus: templated children's stories, the same bytes on every machine. Easy to learn (a small
model levels off near 0.7 nats/token), so it checks the pipeline quickly; it ranks no architectures.
`data.corpora` prepares it into the cache.
"""

from __future__ import annotations

import random


SYNTHETIC_VERSION = 1
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
