"""The shared Ray session keeps what its workers print out of the `sys` streams that tests read with capsys."""

import threading


def test_a_workers_line_arrives_on_the_file_descriptor_not_in_capsys(ray_session, capsys):
    from ray._private import worker as ray_worker

    marker = "laray-test: a line a Ray worker writes to stderr"
    arrived = threading.Event()

    def watch(batch: dict) -> None:
        if any(marker in line for line in batch["lines"]):
            arrived.set()

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.add_handler("laray-test-watch", watch)
    try:

        @ray_session.remote(num_cpus=0)
        def write_to_stderr() -> None:
            import sys

            print(marker, file=sys.stderr, flush=True)

        ray_session.get(write_to_stderr.remote())
        assert arrived.wait(timeout=30), "Ray did not forward the worker's line within 30 s"
    finally:
        dispatcher.remove_handler("laray-test-watch")
    out, err = capsys.readouterr()
    assert marker not in err and marker not in out
