"""The benchmark scripts' own logic that is not timing: what bench_methods copies next to its JSON."""

from benchmarks.bench_methods import copy_report


def test_report_copy_takes_the_linked_figures_under_its_own_name(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "report.md").write_text("# r\n![a](report_pareto.png)\n![b](report_pareto.png)\n")
    (workdir / "report_pareto.png").write_bytes(b"pareto")
    (workdir / "report_early_exit.png").write_bytes(b"not linked")
    copy = copy_report(workdir, tmp_path / "results" / "bench_methods.quick.md")
    assert copy.read_text() == "# r\n![a](bench_methods.quick_report_pareto.png)\n![b](bench_methods.quick_report_pareto.png)\n"
    assert sorted(path.name for path in copy.parent.iterdir()) == ["bench_methods.quick.md",
                                                                   "bench_methods.quick_report_pareto.png"]
    assert (copy.parent / "bench_methods.quick_report_pareto.png").read_bytes() == b"pareto"
