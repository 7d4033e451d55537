"""Fixed, disjoint train / val / test splits of the toy prompts, written as T2I-R1 JSON Lines.

Rebuild the shipped files (deterministic)::

    python -m datamodules.toyworld.splits --out datamodules/toyworld/data
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from datamodules.toyworld.grammar import CATEGORIES, Item, all_items
from datamodules.toyworld.scene import SceneSpec
from datamodules.toyworld.schema import to_metadata

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Categories with few distinct scenes (a shape prompt leaves colours open; a reasoning prompt resolves to
# one group) would lose nearly all their training prompts if whole scenes were held out, and holding out
# a one-group scene ("a red circle") would take a basic word pairing out of training altogether: there
# the held-out unit is the prompt (a new wording or a new combination of references).
SPLIT_BY_PROMPT: frozenset[str] = frozenset({"shape", "reasoning"})


def _by_prompt(item: Item) -> bool:
    """Whether the item is held out as a prompt (a wording) rather than as a scene."""
    return item.category in SPLIT_BY_PROMPT or len(item.spec.groups) == 1


def scene_key(spec: SceneSpec) -> tuple:
    """What a spec means, whatever the order its prompt names the objects in."""
    kinds = [(g.color or "", g.shape, g.count) for g in spec.groups]
    r = spec.relation
    if r is None:
        return (tuple(sorted(kinds)), None)
    rest = [k for i, k in enumerate(kinds) if i not in (r.a, r.b)]
    return (tuple(sorted(rest)), (kinds[r.a], kinds[r.b], r.locality))


def split_items(
    seed: int = 0, eval_per_category: int = 30, unseen_per_category: int = 6, train_per_category: int = 500
) -> dict[str, list[Item]]:
    """Split every category's prompts three ways.

    Prompts that mean the same scene (see :func:`scene_key`) stay in one split, so validation and test
    ask for scenes of several groups never asked for in training, in any category (one-group scenes and
    :data:`SPLIT_BY_PROMPT` categories are split by prompt). Prompts with a held-out colour-shape pair go only to
    validation and test (``unseen_per_category`` of each category's evaluation prompts).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each ordered by category.
    """
    rng = random.Random(seed)
    out: dict[str, list[Item]] = {split: [] for split in SPLITS}
    pools: dict[str, list[Item]] = {}
    for category, items in all_items(seed).items():
        by_key: dict[tuple, list[Item]] = defaultdict(list)
        for item in items:
            key = ("prompt", item.prompt) if _by_prompt(item) else ("scene", scene_key(item.spec))
            by_key[key].append(item)
        keys = sorted(by_key)
        rng.shuffle(keys)
        unseen = [k for k in keys if by_key[k][0].unseen_combo]
        seen = [k for k in keys if not by_key[k][0].unseen_combo]
        for split in ("val", "test"):
            take = [unseen.pop() for _ in range(min(unseen_per_category, len(unseen)))]
            take += [seen.pop() for _ in range(eval_per_category - len(take))]
            # One prompt per held-out scene: the evaluation covers as many scenes as it can.
            out[split] += [rng.choice(by_key[k]) for k in take]
        pools[category] = [item for k in seen for item in by_key[k]]
    # A scene held out for evaluation is held out of training in every category, not just its own.
    held = {scene_key(item.spec) for split in ("val", "test") for item in out[split] if not _by_prompt(item)}
    for pool in pools.values():
        pool = [item for item in pool if scene_key(item.spec) not in held]
        rng.shuffle(pool)
        out["train"] += pool[:train_per_category]
    for split in SPLITS:
        out[split].sort(key=lambda item: CATEGORIES.index(item.category))
    return out


def write_splits(out_dir: str | Path = DATA_DIR, seed: int = 0) -> dict[str, Path]:
    """Write ``{train,val,test}.jsonl`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in split_items(seed).items():
        paths[split] = out_dir / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as f:
            for item in items:
                record = to_metadata(item.prompt, item.category, item.spec, unseen_combo=item.unseen_combo)
                f.write(json.dumps(record) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA_DIR), help="folder for train.jsonl, val.jsonl, test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write_splits(args.out, args.seed).items():
        print(f"{split}: {sum(1 for _ in open(path, encoding='utf-8'))} prompts -> {path}")


if __name__ == "__main__":
    main()
