"""summary.json and its terminal table: each student against the teacher."""

from __future__ import annotations

from rich.table import Table

SIZE_FIELDS = ("params", "size_bytes", "latency_ms", "throughput")


def primary_metric(regression: bool) -> str:
    return "pearson" if regression else "accuracy"


def build_summary(exp, evaluations: dict[str, dict], teacher_result: dict) -> dict:
    teacher_eval = evaluations["teacher"]
    teacher = {"source": exp.teacher.source, "fine_tuned": teacher_result.get("fine_tuned", False),
               "dev": teacher_eval["dev"], "test": teacher_eval["test"], **{k: teacher_eval[k] for k in SIZE_FIELDS}}
    students = {}
    for spec in exp.students:
        result = evaluations[spec.name]
        students[spec.name] = {
            "method": spec.method,
            "layers": spec.student.layers,
            "hidden_size": spec.student.hidden_size or None,
            "dev": result["dev"],
            "test": result["test"],
            **{k: result[k] for k in SIZE_FIELDS},
            "compression": teacher["params"] / result["params"],
            "speedup": teacher["latency_ms"] / result["latency_ms"],
        }
    return {"experiment": exp.name, "metric": primary_metric(exp.task.task_type == "regression"),
            "teacher": teacher, "students": students}


def summary_table(summary: dict) -> Table:
    metric = summary["metric"]
    table = Table(title=f"{summary['experiment']}: students against the teacher ({metric})")
    for column in ("model", "method", "layers", "params", "compression", f"dev {metric}", f"test {metric}",
                   "latency ms", "speedup"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    teacher = summary["teacher"]
    table.add_row("teacher", "-", "-", f"{teacher['params'] / 1e6:.1f}M", "1.0×", f"{teacher['dev'][metric]:.4f}",
                  f"{teacher['test'][metric]:.4f}", f"{teacher['latency_ms']:.1f}", "1.0×", style="bold")
    rows = sorted(summary["students"].items(), key=lambda item: -item[1]["dev"][metric])
    for name, s in rows:
        table.add_row(name, s["method"], str(s["layers"]), f"{s['params'] / 1e6:.1f}M", f"{s['compression']:.1f}×",
                      f"{s['dev'][metric]:.4f}", f"{s['test'][metric]:.4f}", f"{s['latency_ms']:.1f}",
                      f"{s['speedup']:.1f}×")
    return table
