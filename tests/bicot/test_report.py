"""The side-by-side report from hand-made score files: one table per benchmark, published rows labelled."""

from __future__ import annotations

from pathlib import Path

import pytest

from bicot.report import PUBLISHED, ReportError, build_report, main, read_scores

HEADER = "run,benchmark,category,images,unreadable"


def scores_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    janus = scores_file(
        tmp_path / "janus" / "scores.csv",
        f"{HEADER},hps,gdino\n"
        "janus,compbench,color,300,0,0.251000,0.610000\n"
        "janus,compbench,non_spatial,300,0,0.262000,\n"
        "janus,compbench,numeracy,300,0,0.240000,0.500000\n"
        "janus,compbench,all,900,0,0.251000,0.555000\n",
    )
    bicot = scores_file(
        tmp_path / "bicot" / "scores.csv",
        f"{HEADER},hps\nbicot,compbench,color,300,2,0.281234,\nbicot,compbench,all,300,2,0.281234,\n",
    )
    toy = scores_file(
        tmp_path / "toy" / "scores.csv",
        f"{HEADER},toy_orm\ntoy_start,toy,color,80,0,0.125000\ntoy_start,toy,all,80,0,0.125000\n",
    )
    return [janus, bicot, toy]


def section(report: str, title: str) -> str:
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_one_table_per_benchmark_with_published_rows(runs):
    report = build_report(runs)
    assert report.count("\n## ") == 2
    compbench = section(report, "T2I-CompBench")
    lines = [line for line in compbench.splitlines() if line.startswith("|")]
    header = lines[0]
    assert (
        header
        == "| run | scored by | color | shape | texture | spatial | non-spatial | complex | numeracy | all |"
    )
    published = [line for line in lines if "(published)" in line]
    assert len(published) == len(PUBLISHED["compbench"].rows)
    assert (
        "| T2I-R1 (published) | published | 0.8130 | 0.5852 | 0.7243 | 0.3378 | 0.3090 | 0.3993 | – | – |"
        in lines
    )
    assert "| janus | hps | 0.2510 | – | – | – | 0.2620 | – | 0.2400 | 0.2510 |" in lines
    assert "| janus | gdino | 0.6100 | – | – | – | – | – | 0.5000 | 0.5550 |" in lines  # empty cell -> –
    assert "| bicot | hps | 0.2812 | – | – | – | – | – | – | 0.2812 |" in lines
    assert (
        "scored by T2I-CompBench's own metrics" in compbench and "not the benchmark's own scorer" in compbench
    )
    toy = section(report, "Toy world")
    assert "(published)" not in toy and "| toy_start | toy_orm | 0.1250 | 0.1250 |" in toy


def test_benchmark_filter_names_and_cli(runs, tmp_path):
    report = build_report(runs[:2], benchmarks=["compbench"], names=["Janus-Pro (ours)", "bicot-trained"])
    assert "## Toy world" not in report and "| bicot-trained | hps |" in report
    wise = build_report(runs[2:], benchmarks=["wise"])
    assert (
        "| T2I-R1 (published) | published | 0.5400 |" in wise
    )  # a requested benchmark keeps its reference rows
    out = tmp_path / "report" / "report.md"
    main([str(p) for p in runs] + ["--benchmark", "toy", "--out", str(out)])
    assert out.read_text().startswith("# Evaluation report\n\n## Toy world")
    main([str(runs[2]), "--no-published", "--benchmark", "wise"])


def test_bad_score_files_are_named(tmp_path, runs, capsys):
    with pytest.raises(ReportError, match="score file not found"):
        read_scores(tmp_path / "missing.csv")
    bad = scores_file(tmp_path / "bad.csv", f"{HEADER},hps\nr,toy,color,many,0,0.5\n")
    with pytest.raises(ReportError, match=r"bad.csv, line 2: column 'images': not a number: 'many'"):
        read_scores(bad)
    other = scores_file(tmp_path / "other.csv", "category,hps\ncolor,0.5\n")
    with pytest.raises(
        ReportError, match=r"line 1: columns \['run', 'benchmark', 'images', 'unreadable'\] are missing"
    ):
        read_scores(other)
    with pytest.raises(ReportError, match="2 names for 3 score files"):
        build_report(runs, names=["a", "b"])
    with pytest.raises(SystemExit) as exit_info:
        main([str(other)])
    assert exit_info.value.code == 2 and "bicot.report: error:" in capsys.readouterr().err


def test_unknown_benchmark_is_refused_with_the_known_names(runs, capsys):
    with pytest.raises(ReportError, match=r"unknown benchmark 'compbnech'; did you mean 'compbench'\?") as info:
        build_report(runs, benchmarks=["compbnech"])
    assert "known: compbench, geneval, plain, toy, wise" in str(info.value)
    assert "in these score files: compbench, toy" in str(info.value)
    assert "## Toy world" in build_report(runs, benchmarks=["toy"])  # a benchmark of the files is known
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[0]), "--benchmark", "compbnech"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("bicot.report: error: unknown benchmark 'compbnech'")
    assert len(err.strip().splitlines()) == 1


def test_score_file_not_utf8_is_named(tmp_path, capsys):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"{HEADER},hps\nr\xe9sum\xe9,toy,color,3,0,0.5\n".encode("latin-1"))
    with pytest.raises(ReportError, match=r"latin1.csv, line 2: not UTF-8 text"):
        read_scores(latin1)
    with pytest.raises(SystemExit) as exit_info:
        main([str(latin1)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == (
        f"bicot.report: error: {latin1}, line 2: not UTF-8 text; "
        "is this a scores.csv of `bicot test`? (save it as UTF-8)\n"
    )


def test_out_that_is_a_folder_is_refused(runs, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[2]), "--out", str(folder)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == f"bicot.report: error: cannot write the report to {folder}: it is a folder\n"


def test_score_folder_points_at_its_scores_csv(runs, tmp_path, capsys):
    with pytest.raises(ReportError, match=r"janus is a folder, not a score file; did you mean .*janus/scores.csv\?"):
        read_scores(runs[0].parent)
    with pytest.raises(ReportError, match=r"is a folder, not a score file$"):
        read_scores(tmp_path)  # no scores.csv inside: no suggestion
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[0].parent)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"bicot.report: error: {runs[0].parent} is a folder, not a score file; did you mean {runs[0]}?\n"
    )


def test_a_score_file_a_spreadsheet_saved_with_a_bom_reads_the_same(runs, tmp_path):
    bom = tmp_path / "bom" / "scores.csv"
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + runs[1].read_bytes())
    assert read_scores(bom) == read_scores(runs[1])


def test_a_benchmark_no_file_holds_says_so_under_its_published_rows(runs):
    report = build_report([runs[2]], benchmarks=["compbench"])  # only the toy run is given
    assert "(published)" in report and "toy_start" not in report
    assert "None of the given score files holds a run of this benchmark" in report
    assert "Images scored per run: ." not in report
