"""The local Ray the pipeline starts: its workers compete for the cores on equal terms with Ray's own daemons."""

import os


def test_workers_run_at_normal_priority(ray_session):
    @ray_session.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_session.get(niceness.remote()) == 0


def test_without_verbose_ray_data_keeps_its_info_lines_off_the_terminal():
    import logging

    from pipeline.ray_session import quiet_ray_data_console

    quiet_ray_data_console()
    quiet_ray_data_console()  # idempotent: one filter per handler
    handlers = logging.getLogger("ray.data").handlers
    consoles = [handler for handler in handlers if isinstance(handler, logging.StreamHandler)]
    files = [handler for handler in handlers if not isinstance(handler, logging.StreamHandler)]
    assert consoles and files and all(len(handler.filters) <= 2 for handler in consoles)

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data._internal.execution.streaming_executor", level, __file__, 1, message,
                                 None, None)

    plan = record(logging.INFO, "Execution plan of Dataset dataset_1: InputDataBuffer[Input] -> TaskPoolMapOperator")
    no_cpu = record(logging.WARNING, "Warning: The Ray cluster currently does not have any available CPUs.")
    unreadable = record(logging.WARNING, "a block could not be read")
    for console in consoles:  # the terminal: warnings only, less the one the scheduler causes
        assert not console.filter(plan) and not console.filter(no_cpu) and console.filter(unreadable)
    for file in files:  # the log file keeps everything
        assert file.filter(plan) and file.filter(no_cpu)
