"""Side-by-side report: scored runs (scores.csv) as one Markdown table per benchmark, published rows included.

Usage::

    python -m bicot.report eval/janus/scores.csv eval/bicot/scores.csv eval/flux/scores.csv \\
        --benchmark compbench --out report.md
"""

from __future__ import annotations

import argparse
import csv
import difflib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The score file format (`bicot test` writes it through bicot.scoring); defined here so that this
# command needs nothing beyond the standard library and starts at once.
ALL = "all"  # the row over every image, whatever its category
META_COLUMNS: tuple[str, ...] = ("run", "benchmark", "category", "images", "unreadable")


@dataclass(frozen=True)
class Published:
    """Numbers a paper reports for a benchmark, with what scored them.

    Attributes:
        title: the benchmark's name in headings.
        columns: categories in bicot's names (``all`` is the benchmark's overall score).
        rows: model -> category -> score.
        scorer: what produced the numbers (never a bicot expert).
        source: where they are printed.
    """

    title: str
    columns: tuple[str, ...]
    rows: dict[str, dict[str, float]]
    scorer: str
    source: str


_PAPER = "T2I-R1 (arXiv 2505.00703)"
_COMPBENCH = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def _compbench(*scores: float) -> dict[str, float]:
    return dict(zip(_COMPBENCH, scores, strict=True))


# The paper's comparison table; its Janus-Pro row was generated without reasoning, its T2I-R1 row with.
PUBLISHED: dict[str, Published] = {
    "compbench": Published(
        title="T2I-CompBench",
        columns=_COMPBENCH,
        rows={
            "Janus-Pro-7B": _compbench(0.6359, 0.3528, 0.4936, 0.2061, 0.3085, 0.3559),
            "T2I-R1": _compbench(0.8130, 0.5852, 0.7243, 0.3378, 0.3090, 0.3993),
            "FLUX.1": _compbench(0.7407, 0.5718, 0.6922, 0.2863, 0.3127, 0.3703),
        },
        scorer=(
            "T2I-CompBench's own metrics (BLIP-VQA for attributes, UniDet for spatial, CLIP for "
            "non-spatial, 3-in-1 for complex)"
        ),
        source=_PAPER,
    ),
    "wise": Published(
        title="WISE",
        columns=(ALL,),
        rows={"Janus-Pro-7B": {ALL: 0.35}, "T2I-R1": {ALL: 0.54}, "FLUX.1": {ALL: 0.50}},
        scorer="WiScore (a GPT-4o judge), overall",
        source=_PAPER,
    ),
}
TITLES = {"geneval": "GenEval", "toy": "Toy world", "plain": "Prompt set"}
HEADERS = {"non_spatial": "non-spatial", "3d_spatial": "3d-spatial", ALL: "all"}


class ReportError(ValueError):
    """A score file that cannot be read; the message names the file and the line."""


@dataclass
class RunScores:
    """One run's scores on one benchmark: expert -> category -> mean, and images per category."""

    run: str
    benchmark: str
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)


def read_scores(path: str | Path) -> list[RunScores]:
    """Read a ``scores.csv`` of ``bicot test``: columns ``run,benchmark,category,images,unreadable,<expert>...``.

    Raises:
        ReportError: missing or unreadable file, a folder, text that is not UTF-8, missing columns, or a
            value that is not a number.
    """
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {path / 'scores.csv'}?" if (path / "scores.csv").is_file() else ""
        raise ReportError(f"{path} is a folder, not a score file{hint}")
    if not path.is_file():
        raise ReportError(f"score file not found: {path}")
    try:
        return _read_rows(path)
    except UnicodeDecodeError as err:  # the decoder's offset is within a chunk: find the line in the bytes
        data = path.read_bytes()
        try:
            data.decode("utf-8")
            where = ""
        except UnicodeDecodeError as exact:
            line = data.count(b"\n", 0, exact.start) + 1
            where = f", line {line}"
        raise ReportError(
            f"{path}{where}: not UTF-8 text; is this a scores.csv of `bicot test`? (save it as UTF-8)"
        ) from err
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror or err}") from err


def _read_rows(path: Path) -> list[RunScores]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's leading BOM is dropped
        reader = csv.DictReader(f)
        missing = [c for c in META_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(
                f"{path}, line 1: columns {missing} are missing; is this a scores.csv of `bicot test`?"
            )
        experts = [c for c in reader.fieldnames if c not in META_COLUMNS]
        runs: dict[tuple[str, str], RunScores] = {}
        for line, row in enumerate(reader, start=2):
            key = (row["run"], row["benchmark"])
            scores = runs.setdefault(key, RunScores(*key))
            scores.images[row["category"]] = _number(row["images"], path, line, "images", int)
            for expert in experts:
                value = _number(row[expert], path, line, expert, float) if row[expert] else math.nan
                scores.means.setdefault(expert, {})[row["category"]] = value
    if not runs:
        raise ReportError(f"{path} holds no scores")
    return list(runs.values())


def _number(text: str | None, path: Path, line: int, column: str, kind: type) -> float:
    try:
        return kind(text)
    except (TypeError, ValueError) as err:
        raise ReportError(f"{path}, line {line}: column {column!r}: not a number: {text!r}") from err


def _cell(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


def benchmark_table(benchmark: str, runs: Sequence[RunScores], published: bool = True) -> str:
    """One Markdown section: published rows (labelled) first, then one row per (run, expert)."""
    ref = PUBLISHED.get(benchmark) if published else None
    columns = list(ref.columns) if ref else []
    seen = sorted({c for r in runs for m in r.means.values() for c in m} - set(columns) - {ALL})
    columns += seen
    if ALL not in columns and any(ALL in m for r in runs for m in r.means.values()):
        columns.append(ALL)
    head = ["run", "scored by", *(HEADERS.get(c, c) for c in columns)]
    lines = [f"| {' | '.join(head)} |", f"|---|---|{'|'.join(['---:'] * len(columns))}|"]
    for model, values in ref.rows.items() if ref else []:
        cells = [f"{model} (published)", "published", *(_cell(values.get(c)) for c in columns)]
        lines.append(f"| {' | '.join(cells)} |")
    for run in runs:
        for expert, values in run.means.items():
            lines.append(f"| {' | '.join([run.run, expert, *(_cell(values.get(c)) for c in columns)])} |")
    title = ref.title if ref else TITLES.get(benchmark, benchmark)
    notes = []
    if ref:
        notes.append(
            f"Rows marked *(published)* are the numbers printed in {ref.source}, scored by {ref.scorer}. "
            "The other rows are bicot runs scored by the reward expert named in *scored by*: compare rows "
            "scored the same way; a bicot expert is not the benchmark's own scorer."
        )
    if runs:
        counts = "; ".join(f"{r.run}: {r.images.get(ALL, sum(r.images.values()))}" for r in runs)
        notes.append(f"Images scored per run: {counts}.")
    else:  # a benchmark asked for by name that none of the score files holds
        notes.append("None of the given score files holds a run of this benchmark: only the published rows.")
    return f"## {title}\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def build_report(
    paths: Sequence[str | Path],
    benchmarks: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    published: bool = True,
) -> str:
    """The whole report: one section per benchmark found in the files (or those asked for).

    Args:
        paths: ``scores.csv`` files of ``bicot test`` runs.
        benchmarks: only these benchmarks (each gets a section, with its published rows, even if no
            file has it); default: every benchmark in the files. A name neither in the files nor in
            ``PUBLISHED`` or ``TITLES`` raises :class:`ReportError` (a typo would give an empty table).
        names: labels of the runs, one per file (default: the run names inside the files).
        published: add the published reference rows.
    """
    if names is not None and len(names) != len(paths):
        raise ReportError(f"{len(names)} names for {len(paths)} score files: give one name per file")
    runs: list[RunScores] = []
    for i, path in enumerate(paths):
        for run in read_scores(path):
            run.run = names[i] if names is not None else run.run
            runs.append(run)
    found = list(dict.fromkeys(r.benchmark for r in runs))
    known = sorted({*found, *PUBLISHED, *TITLES})  # in the files, or named by this module
    unknown = [b for b in benchmarks or () if b not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise ReportError(
            f"unknown benchmark {unknown[0]!r}{f'; did you mean {close[0]!r}?' if close else ''} "
            f"(known: {', '.join(known)}; in these score files: {', '.join(found)})"
        )
    order = list(benchmarks) if benchmarks else found
    sections = [benchmark_table(b, [r for r in runs if r.benchmark == b], published) for b in order]
    return "# Evaluation report\n\n" + "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bicot.report RUN.csv ... [--benchmark NAME ...] [--names A B ...] [--out report.md]``."""
    parser = argparse.ArgumentParser(prog="python -m bicot.report", description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="+", help="scores.csv files written by `bicot test`")
    parser.add_argument("--benchmark", action="append", help="only this benchmark (repeatable)")
    parser.add_argument("--names", nargs="+", help="one label per score file")
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    parser.add_argument("--no-published", action="store_true", help="leave out the published reference rows")
    args = parser.parse_args(argv)
    try:
        text = build_report(args.scores, args.benchmark, args.names, not args.no_published)
    except ReportError as err:
        print(f"bicot.report: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as err:
            reason = "it is a folder" if Path(args.out).is_dir() else (err.strerror or str(err))
            print(f"bicot.report: error: cannot write the report to {args.out}: {reason}", file=sys.stderr)
            sys.exit(2)
        print(f"bicot.report: wrote {args.out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
