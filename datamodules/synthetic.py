"""A seeded, Amazon-like synthetic dataset written in LC-Rec format (the embedded default).

Items belong to categories and have a popularity (Zipf) and a latent vector near their category's centre;
users have tastes mixing one to three categories. Sequences come from a vectorised sampler that, at every
step, prefers (a) the designated follow-up items of the previous item (sequels, accessories) and (b) items
near the user's taste, weighted by popularity, never repeating an item. So there is structure a sequential
model can learn (transitions), structure a CF model can learn (tastes), and text that tells categories apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datamodules.artifacts import manifest_matches, write_manifest
from datamodules.catalogue import lcrec_paths, write_lcrec

_CATEGORIES = [
    ("racing", "wheel"),
    ("puzzle", "cube"),
    ("strategy", "board"),
    ("shooter", "controller"),
    ("fantasy", "saga"),
    ("sports", "league"),
    ("retro", "console"),
    ("horror", "tale"),
    ("music", "rhythm"),
    ("kids", "party"),
    ("space", "odyssey"),
    ("simulation", "tycoon"),
]
_ADJECTIVES = ["Ultimate", "Classic", "Deluxe", "Pro", "Legendary", "Turbo", "Mega", "Super", "Epic", "Mini"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic dataset.

    Args:
        num_users: number of users.
        num_items: number of items.
        num_categories: number of item categories (at most 12 named ones; more are numbered).
        mean_length: mean sequence length (minimum 5, as after a 5-core filter).
        follow_up_prob: probability mass on the previous item's follow-ups at each step.
        seed: random seed; the same spec always writes the same files.
    """

    num_users: int = 2000
    num_items: int = 500
    num_categories: int = 10
    mean_length: float = 9.0
    follow_up_prob: float = 0.6
    seed: int = 0


def _category_name(category: int) -> tuple[str, str]:
    if category < len(_CATEGORIES):
        return _CATEGORIES[category]
    return f"genre{category}", "edition"


def generate_sequences(spec: SyntheticSpec) -> tuple[dict[int, list[int]], np.ndarray]:
    """Sample users' sequences. Returns ``{user: [items]}`` and the items' categories."""
    if spec.num_items < 20 or spec.num_users < 1:
        raise ValueError(f"synthetic spec needs num_items >= 20 and num_users >= 1, got {spec}")
    rng = np.random.default_rng(spec.seed)
    num_users, num_items, dim = spec.num_users, spec.num_items, 16
    category = rng.integers(0, spec.num_categories, num_items)
    centres = rng.normal(size=(spec.num_categories, dim))
    item_vec = centres[category] + 0.5 * rng.normal(size=(num_items, dim))
    log_popularity = -1.1 * np.log(rng.permutation(num_items) + 1.0)
    # each item has 3 follow-ups drawn from its own category (sequels, accessories)
    same_cat = [np.flatnonzero(category == c) for c in range(spec.num_categories)]
    follow_ups = np.stack(
        [rng.choice(same_cat[c], 3) if len(same_cat[c]) else rng.integers(0, num_items, 3) for c in category]
    )

    taste_cats = rng.integers(0, spec.num_categories, (num_users, 3))
    taste_weights = rng.dirichlet(np.full(3, 0.5), num_users)
    taste = np.einsum("uk,ukd->ud", taste_weights, centres[taste_cats])
    affinity = taste @ item_vec.T / np.sqrt(dim) + log_popularity[None, :]

    lengths = 5 + rng.geometric(1.0 / max(spec.mean_length - 4.0, 1.0), num_users) - 1
    lengths = np.minimum(lengths, num_items // 2)
    max_length = int(lengths.max())
    sequences = np.full((num_users, max_length), -1, dtype=np.int64)
    seen = np.zeros((num_users, num_items), dtype=bool)
    rows = np.arange(num_users)
    for step in range(max_length):  # vectorised over users; the loop is over positions only
        logits = affinity.copy()
        if step > 0:
            previous = sequences[:, step - 1]
            boost = np.zeros_like(logits)
            boost[rows[:, None], follow_ups[previous]] = np.log(
                spec.follow_up_prob / (1 - spec.follow_up_prob) * num_items / 3
            )
            logits = (
                np.logaddexp(logits, boost + logits.mean(axis=1, keepdims=True)) if spec.follow_up_prob > 0 else logits
            )
        logits[seen] = -np.inf
        choice = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        active = step < lengths
        sequences[active, step] = choice[active]
        seen[rows[active], choice[active]] = True
    return {user: sequences[user, : lengths[user]].tolist() for user in range(num_users)}, category


def _item_text(spec: SyntheticSpec, category: np.ndarray) -> dict[int, dict[str, str]]:
    rng = np.random.default_rng(spec.seed + 1)
    text = {}
    for item, cat in enumerate(category.tolist()):
        genre, noun = _category_name(cat)
        adjective = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
        text[item] = {
            "title": f"{adjective} {genre.title()} {noun.title()} {item}",
            "description": f"A {genre} {noun} for fans of {genre} games. Edition {int(rng.integers(1, 9))}.",
            "categories": f"Games > {genre.title()}",
        }
    return text


def write_synthetic(out_dir: str | Path, spec: SyntheticSpec, name: str = "Synthetic") -> Path:
    """Write (or reuse, when the manifest matches) the synthetic dataset in LC-Rec format under ``out_dir``."""
    out_dir = Path(out_dir)
    wanted = {"generator": "semantic-convergence.synthetic/1", "name": name, "spec": asdict(spec)}
    if lcrec_paths(out_dir, name)["inter"].is_file() and manifest_matches(out_dir, wanted):
        return out_dir
    sequences, category = generate_sequences(spec)
    item_text = _item_text(spec, category)
    reviews = {
        # reviewed item = the first interaction, which is always in the training part of the split
        user: {seq[0]: f"Looking for a good {_category_name(int(category[seq[0]]))[0]} game like this one."}
        for user, seq in sequences.items()
    }
    write_lcrec(out_dir, name, sequences, item_text=item_text, reviews=reviews)
    write_manifest(out_dir, wanted)
    return out_dir
