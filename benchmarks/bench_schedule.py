"""The schedule simulation: a finished run's DAG replayed on 1, 4 and 16 nodes under the runner's own policy.

Plans the experiment as ``python -m pipeline run CONFIG --seeds N`` would (``PipelineRunner.plan``: no Ray, no
MLflow), reads every planned stage's recorded ``seconds`` from the workdir's artifact store under the stage's
planned key, and replays the DAG with a virtual clock (``pipeline.schedule.simulate``, which drives the same
``Scheduler`` that ``execute_all`` drives) with the limits the runner would compute for a cluster of N such
nodes: its cap on stages at once (``pipeline.schedule.stage_capacity``, the arithmetic of
``PipelineRunner.concurrency``) and its CPU budget for the stages' actors (``pipeline.schedule.cpu_budget``, with
each stage's ``cpus_held``).
Beside it: the critical path, the wall time no number of nodes beats, and the recorded wall time of the run.

The durations were recorded on one machine, where stages ran one or two at a time and may have slowed each other;
the simulation assumes each stage keeps its recorded duration on a node of its own, and knows nothing of data
movement between nodes, Ray's scheduling delays or a node's start-up. It is how a plan for a cluster is checked,
not a measurement of one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a file: import the benchmarks package

from benchmarks._common import REPO_ROOT, console, machine_info, print_table, write_results

NAME = "bench_schedule"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"
CAVEAT = ("Caveat: the durations were recorded on one machine, where stages ran one or two at a time and may have "
          "slowed each other; the simulation assumes each stage keeps its recorded duration on a node of its own, "
          "and ignores data movement between nodes, Ray's scheduling delays and node start-up.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="The workdir of the finished run (its artifacts/ are read, never written).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Experiment file of the run (default: configs/benchmark.yaml).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds the run was made with (default: 3).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Overrides the run was made with (repeatable).")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16], help="Cluster sizes (default: 1 4 16).")
    parser.add_argument("--cpus-per-node", type=float, default=None,
                        help="CPUs of one node: the machine the run was recorded on (default: the config's "
                        "ray.num_cpus, else this machine's cores).")
    parser.add_argument("--gpus-per-node", type=float, default=0, help="GPUs of one node (only with ray.use_gpu; default: 0).")
    parser.add_argument("--allow-missing", action="store_true",
                        help="Count a stage with no finished artifact as taking no time (with a warning) instead of failing; "
                        "the results then go to bench_schedule.quick.json.")
    parser.add_argument("--match-names", action="store_true",
                        help="Where no artifact has a stage's planned key, take the newest artifact of its stage whose "
                        "manifest names the stage: for a workdir written by another revision of kd/ or stages/ "
                        "(whose code is part of every key).")
    return parser.parse_args(argv)


def by_node_name(store_root: Path, stage: str) -> dict[str, Path]:
    """The newest finished artifact folder of ``stage`` for each node name its manifests record."""
    from pipeline.artifacts import COMPLETE_MARKER
    from pipeline.runner import MANIFEST_FILE

    found: dict[str, tuple[float, Path]] = {}
    for manifest in (store_root / stage).glob(f"*/{MANIFEST_FILE}"):
        if not (manifest.parent / COMPLETE_MARKER).exists():
            continue
        name = json.loads(manifest.read_text()).get("node")
        mtime = manifest.stat().st_mtime
        if name is not None and (name not in found or mtime > found[name][0]):
            found[name] = (mtime, manifest.parent)
    return {name: path for name, (_, path) in found.items()}


def recorded(runner, match_names: bool = False) -> tuple[dict[str, dict], list[str]]:
    """Each planned node's recorded result (``seconds``, ``started_at``, ``finished_at``) and where it was found,
    and the nodes with none. Nodes that share a planned key (an ensemble member equal to the teacher) share the one
    artifact, as they do in a run."""
    from pipeline.artifacts import Artifact

    found: dict[str, dict] = {}
    missing: list[str] = []
    names_by_stage: dict[str, dict[str, Path]] = {}
    for name, node in runner.nodes.items():
        key = runner.planned(name).key
        artifact = runner.store.lookup(node.stage, key)
        how = "key"
        if artifact is None and match_names:
            twins = [other for other, n in runner.nodes.items()
                     if n.stage == node.stage and runner.planned(other).key == key]
            if node.stage not in names_by_stage:
                names_by_stage[node.stage] = by_node_name(runner.store.root, node.stage)
            paths = [names_by_stage[node.stage][twin] for twin in twins if twin in names_by_stage[node.stage]]
            if paths:
                artifact, how = Artifact(node.stage, paths[0].name, paths[0]), "name"
        result = artifact.result() if artifact is not None else {}
        if "seconds" not in result:
            missing.append(name)
            continue
        found[name] = {"stage": node.stage, "key": key, "artifact": f"{node.stage}/{artifact.key}", "matched_by": how,
                       **{field: result.get(field) for field in ("seconds", "started_at", "finished_at")}}
    return found, missing


def recorded_wall(found: dict[str, dict]) -> float | None:
    """The run's wall time as its stages recorded it: the last finish less the first start, over distinct artifacts
    (None where a result lacks the bounds). It includes whatever another run left in the cache, if anything."""
    spans = {entry["artifact"]: (entry["started_at"], entry["finished_at"]) for entry in found.values()}
    if not spans or any(start is None or finish is None for start, finish in spans.values()):
        return None
    return max(finish for _, finish in spans.values()) - min(start for start, _ in spans.values())


def schedule(runner, node_counts: list[int], cpus_per_node: float, gpus_per_node: float = 0,
             allow_missing: bool = False, match_names: bool = False) -> dict:
    """The figures: per cluster size, the runner's cap and the simulated wall time; the critical path; the
    recorded wall time. ``runner`` has planned its nodes."""
    from pipeline.schedule import capacities, cpu_budget, critical_path, simulate

    found, missing = recorded(runner, match_names)
    if missing and not allow_missing:
        raise SystemExit(f"{len(missing)} planned stage(s) have no finished artifact in {runner.store.root}: "
                         + ", ".join(repr(name) for name in missing[:8]) + (" …" if len(missing) > 8 else "")
                         + "\n(is the run finished, with the same config, --seeds and code? --allow-missing counts "
                         "them as taking no time; --match-names matches artifacts by stage name)")
    if missing:
        console.print(f"[yellow]warning: {len(missing)} of {len(runner.nodes)} planned stage(s) have no finished "
                      "artifact and are counted as taking 0 s: " + ", ".join(repr(name) for name in missing[:8])
                      + (" …" if len(missing) > 8 else "") + "[/yellow]", highlight=False)
    durations = {name: found[name]["seconds"] if name in found else 0.0 for name in runner.nodes}
    scheduling = runner.scheduling()
    keys = scheduling["keys"]
    caps = capacities(runner.exp.ray, cpus_per_node, node_counts, gpus_per_node)
    path_seconds, path = critical_path(runner.nodes, durations)
    rows = []
    for n in node_counts:
        budget = cpu_budget({"CPU": n * cpus_per_node})
        wall, timeline = simulate(runner.nodes, durations, caps[n], budget=budget, **scheduling)
        rows.append({"nodes": n, "cpus": n * cpus_per_node, "max_concurrent_stages": caps[n], "cpu_budget": budget,
                     "wall_s": round(wall, 2),
                     "peak_running": peak(timeline),
                     "timeline": [[span.name, round(span.start, 2), round(span.finish, 2), span.outcome]
                                  for span in timeline]})
    unlimited, _ = simulate(runner.nodes, durations, math.inf, keys=keys)
    base = next((row["wall_s"] for row in rows if row["nodes"] == 1), None)
    for row in rows:
        row["speedup_over_1_node"] = round(base / row["wall_s"], 2) if base and row["wall_s"] else None
    return {"stages": len(runner.nodes), "recorded_stages": len(found), "missing": missing,
            "matched_by_name": sorted(name for name, entry in found.items() if entry["matched_by"] == "name"),
            "cpus_per_node": cpus_per_node, "gpus_per_node": gpus_per_node,
            "sum_of_stage_seconds": round(sum({keys[name]: durations[name] for name in runner.nodes}.values()), 2),
            "recorded_wall_s": None if (wall := recorded_wall(found)) is None else round(wall, 2),
            "simulated": rows, "unlimited_wall_s": round(unlimited, 2),
            "critical_path_s": round(path_seconds, 2), "critical_path": path,
            "durations": {name: found[name] for name in found}, "caveat": CAVEAT}


def peak(timeline) -> int:
    """The most stages running at once in a simulated timeline (one finishing at t is gone before one starting
    at t)."""
    events = sorted([(span.start, 1) for span in timeline if span.finish > span.start]
                    + [(span.finish, -1) for span in timeline if span.finish > span.start])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def print_figures(results: dict, exp_name: str, seeds: int) -> None:
    rows = [[row["nodes"], f"{row['cpus']:g}", row["max_concurrent_stages"], row["peak_running"], minutes(row["wall_s"]),
             f"{row['speedup_over_1_node']:.2f}x" if row["speedup_over_1_node"] else "-"] for row in results["simulated"]]
    rows.append(["unlimited", "-", "-", "-", minutes(results["unlimited_wall_s"]), "-"])
    rows.append(["critical path", "-", "-", "-", minutes(results["critical_path_s"]), "-"])
    rows.append(["recorded run", "-", "-", "-", minutes(results["recorded_wall_s"]), "-"])
    caption = (f"{results['stages']} stages of {exp_name} --seeds {seeds}, {results['recorded_stages']} with a recorded "
               f"duration, {minutes(results['sum_of_stage_seconds'])} of stages in all; "
               f"{results['cpus_per_node']:g} CPUs a node. Critical path: "
               + " → ".join(results["critical_path"]) + f".\n{CAVEAT}")
    if results["missing"]:
        caption += f"\n[yellow]{len(results['missing'])} stage(s) had no finished artifact and count as 0 s: " \
                   "these figures are not the run's.[/yellow]"
    print_table("Simulated wall time by cluster size (the runner's own schedule)",
                ["nodes", "CPUs", "stages at once", "peak running", "wall time", "speedup over 1 node"], rows,
                caption=caption)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()

    import ray

    from pipeline.config import load_experiment
    from pipeline.runner import PipelineRunner

    exp = load_experiment(args.config, args.overrides, args.workdir)
    runner = PipelineRunner(exp, seeds=args.seeds, verbose=False)
    runner.plan()
    if ray.is_initialized():  # planning must stay off Ray: this runs beside (or long after) the run itself
        raise RuntimeError("planning started Ray")
    cpus = args.cpus_per_node or exp.ray.num_cpus or os.cpu_count()
    results = schedule(runner, args.nodes, cpus, args.gpus_per_node, args.allow_missing, args.match_names)
    print_figures(results, exp.name, args.seeds)
    # A partial run's figures are a smoke test: they go to the .quick file and never replace the real ones.
    write_results(NAME, bool(results["missing"]), machine, {**vars(args), "cpus_per_node": cpus}, results)
    return results


if __name__ == "__main__":
    main()
