"""cluster.yaml passes Ray's own cluster-launcher schema, with the node types the stages expect."""

from pathlib import Path

import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_a_valid_launcher_config():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))


def test_node_types_carry_the_stage_resources():
    config = yaml.safe_load(CLUSTER.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    for name in ("cpu_worker", "gpu_worker"):
        assert {"teacher_labeler", "trainer"} <= set(types[name]["resources"])


def test_nodes_start_workers_at_normal_priority():
    config = yaml.safe_load(CLUSTER.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and all(command.startswith("RAY_worker_niceness=0 ") for command in starts), key
