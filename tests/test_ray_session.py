"""The local Ray the pipeline starts: its workers compete for the cores on equal terms with Ray's own daemons."""

import os


def test_workers_run_at_normal_priority(ray_session):
    @ray_session.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_session.get(niceness.remote()) == 0


def test_without_verbose_ray_data_keeps_its_info_lines_off_the_terminal(capsys):
    import logging

    from pipeline.ray_session import quiet_ray_data_console

    quiet_ray_data_console()
    quiet_ray_data_console()  # idempotent: one filter per handler
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    executor.info("Execution plan of Dataset dataset_1: InputDataBuffer[Input] -> TaskPoolMapOperator")
    executor.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang")
    executor.warning("a block could not be read")
    shown = capsys.readouterr().err
    assert "a block could not be read" in shown
    assert "Execution plan" not in shown and "available CPUs" not in shown
