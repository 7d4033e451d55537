"""The paper's ablation in miniature: both CoT levels, semantic only, token only, per-category accuracy.

    python benchmarks/toy_ablation.py                 # 3 configs x seeds 0 1 2, one fit after another
    python benchmarks/toy_ablation.py --seeds 0       # quicker, one seed
    python benchmarks/toy_ablation.py --reuse         # reuse finished runs of the same name (toy_learning.py's too)

Runs ``configs/toy.yaml`` alone and composed with ``configs/toy_semantic_only.yaml`` and
``configs/toy_token_only.yaml``, reads validation accuracy after training from MLflow and writes a
Markdown table (rows: configuration; columns: categories; mean ± std over seeds) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_learning import CATEGORIES, mean_std, run_seeds, write_report  # noqa: E402

# name -> (run-name tag, configs). The main job's tag is toy_learning.py's, so --reuse shares its runs.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "both levels (toy.yaml)": ("toy-learning", ["configs/toy.yaml"]),
    "semantic only": ("toy-semantic-only", ["configs/toy.yaml", "configs/toy_semantic_only.yaml"]),
    "token only": ("toy-token-only", ["configs/toy.yaml", "configs/toy_token_only.yaml"]),
}


def ablation_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per variant (after training) plus its starting point, accuracy in %."""
    keys = ("all", *CATEGORIES)
    lines = ["| configuration | " + " | ".join(keys) + " | reward first -> last |", "|---" * (len(keys) + 2) + "|"]
    for name, per_seed in results.items():
        for when in ("before", "after"):
            cells = [mean_std([r[f"acc/{k}/{when}"] for r in per_seed if f"acc/{k}/{when}" in r]) for k in keys]
            reward = ""
            if when == "after":
                first = mean_std([r["reward/first"] for r in per_seed if "reward/first" in r], 1, 3)
                last = mean_std([r["reward/last"] for r in per_seed if "reward/last" in r], 1, 3)
                reward = f"{first} -> {last}"
            lines.append(f"| {name}, {when} | " + " | ".join(cells) + f" | {reward} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--reuse", action="store_true", help="tabulate finished runs of the same name instead of refitting")
    parser.add_argument("--out", default="benchmarks/results/toy_ablation.md")
    args = parser.parse_args()
    results = {}
    for name, (tag, configs) in VARIANTS.items():
        results[name] = run_seeds(configs, args.seeds, args.tracking_uri, tag, args.reuse, [])
    text = (
        f"Validation accuracy (%) per category before and after training, seeds {args.seeds}, mean ± std over "
        "seeds. Token only draws without a plan, so its starting point differs.\n\n" + ablation_table(results) + "\n"
    )
    write_report(args.out, text)


if __name__ == "__main__":
    main()
