"""The local Ray the pipeline starts: its workers compete for the cores on equal terms with Ray's own daemons."""

import os


def test_workers_run_at_normal_priority(ray_session):
    @ray_session.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_session.get(niceness.remote()) == 0
