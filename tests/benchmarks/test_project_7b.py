"""The 7B projection reads gpu_checks.sh logs and does its arithmetic from them (no GPU needed)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from project_7b import project  # noqa: E402


def write_logs(folder: Path, ms: dict[str, float], score: float, update: float) -> None:
    rollout = [dict(measure=name, device="Fake GPU", ms_per_step=v, image_tokens=576) for name, v in ms.items()]
    (folder / "rollout7b.log").write_text("=== noise\n" + "\n".join(json.dumps(r) for r in rollout) + "\n")
    steps = [dict(measure="summary", engine=e, images_per_step=32, steady_score_s=score, steady_update_s=update)
             for e in ("static", "eager")]
    (folder / "step1b.log").write_text("\n".join(json.dumps(s) for s in steps) + "\ntraceback lines\n")


def table_row(text: str, engine: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {engine} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_projection_from_logs(tmp_path):
    write_logs(tmp_path, {"eager": 100.0, "static[cudagraphs]": 10.0, "static[fused]": 5.0}, score=0.5, update=3.0)
    text = project(tmp_path)
    static, eager = table_row(text, "static (cudagraphs)"), table_row(text, "eager")
    assert table_row(text, "static (fused)")[2].startswith("2.9 (measured")  # each engine mode gets its row
    assert static[2].startswith("5.8 (measured")  # 10 ms x 576 tokens
    assert eager[2].startswith("57.6 (measured") and eager[1].startswith("12.8")  # 100 ms x 128 plan tokens
    ratio = float(re.search(r"7B / 1B = ([0-9.]+)", text).group(1))
    assert float(static[4].split()[0]) == round(3.0 * ratio * 0.5 * 4 / 3, 1)
    step = sum(float(c.split()[0]) for c in static[1:5])
    assert abs(float(static[5]) - step) < 0.11 and abs(float(static[6]) - float(static[5]) * 1600 / 3600) < 0.06


def test_the_committed_h200_projection_is_what_the_script_writes():
    folder = ROOT / "benchmarks/results/h200_2026-11-27"
    # the script was run from the repository root: the table names the folder relative to it
    assert (folder / "projection_7b.md").read_text() == project(folder.relative_to(ROOT))
