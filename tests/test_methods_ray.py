"""One Ray Train smoke run per method family beyond logits: an online teacher with hidden states, attentions
and two phases (TinyBERT), on the smoke profile's cached data, teacher and labels."""

import mlflow
import pytest
from rich.console import Console

from pipeline.config import load_experiment
from pipeline.runner import PipelineRunner

from conftest import SMOKE_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

ONLINE_STUDENT = ('students=[{name: tinybert_2L, method: tinybert, student: {layers: 2}, '
                  'params: {intermediate_epochs: 1, prediction_epochs: 1}, '
                  'train: {epochs: 1, batch_size: 32, learning_rate: 1.0e-4, report_every: 2}}]')


def test_online_two_phase_method_trains_through_ray(smoke_pipeline):
    exp, _, _ = smoke_pipeline
    online = load_experiment(SMOKE_CONFIG, [ONLINE_STUDENT], workdir=exp.workdir)
    runner = PipelineRunner(online, Console(width=160))
    summary = runner.run()
    assert runner.counts["ran"] == 2  # only its distill and evaluate: data, teacher and teacher eval are cached
    student = summary["students"]["tinybert_2L"]
    assert student["method"] == "tinybert" and 0 <= student["dev"]["accuracy"] <= 1
    mlflow.set_tracking_uri(online.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[online.experiment_name], output_format="list")
    distill = [r for r in runs if r.info.run_name == "distill tinybert_2L (tinybert)"]
    assert len(distill) == 1
    curves = distill[0].data.metrics
    assert {"loss_embedding", "loss_attention", "loss_hidden", "loss_soft_ce"} <= set(curves)
