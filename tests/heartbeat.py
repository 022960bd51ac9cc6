"""A pytest plugin: a test that runs longer than a minute says so every minute, so a long run is never silent.

It hangs on the log hooks (a test's start and end as reported), which run where the terminal is: in the one
process of a plain run, and in the controller under pytest-xdist (-n), for the tests of every worker.
"""

import contextlib
import os
import threading
import time

INTERVAL_S = float(os.environ.get("QWEN_TEST_HEARTBEAT_S", "60"))


def pytest_configure(config):
    config.pluginmanager.register(_Heartbeat(config), "heartbeat-reporter")


class _Heartbeat:
    def __init__(self, config):
        self.config = config
        self.running: dict[str, threading.Event] = {}  # nodeid -> set when its last report is in

    def pytest_runtest_logstart(self, nodeid, location):
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:  # an xdist worker: the controller says it
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        done = self.running[nodeid] = threading.Event()
        started = time.monotonic()

        def beat():
            while not done.wait(INTERVAL_S):
                # a plain run captures the test's output at the file descriptor: step out of it for this one line
                with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                    reporter.write_line(f"  ... still running {nodeid} ({time.monotonic() - started:.0f} s)")

        threading.Thread(target=beat, daemon=True).start()

    def pytest_runtest_logfinish(self, nodeid, location):
        done = self.running.pop(nodeid, None)
        if done is not None:
            done.set()
