"""Orchestration: the experiment schema, the CLI, the stage graph, the artifact cache and MLflow helpers."""
