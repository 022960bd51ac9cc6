"""A pytest plugin: a test that runs longer than a minute says so every minute, so a long run is never silent."""

import contextlib
import os
import threading
import time

import pytest

INTERVAL_S = float(os.environ.get("QWEN_TEST_HEARTBEAT_S", "60"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    capture = item.config.pluginmanager.get_plugin("capturemanager")
    done = threading.Event()
    started = time.monotonic()

    def beat():
        while not done.wait(INTERVAL_S):
            # the test's output is captured at the file descriptor: step out of it for this one line
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(f"  ... still running {item.nodeid} ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    if reporter is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
