"""The fault-injection suite (issue 14): real loopback peers, hostile inputs and crashes.

Every test that takes the `fault` fixture is one fault tried; it survived when the test
passed (its asserts are the survival criteria: honest peers keep training, agree, and
lose nothing). At the end of the session tests/conftest.py prints a summary line:

    faults survived: N / N tried; bad inputs rejected: N / N (and N valid inputs accepted); data lost: 0

with a per-fault table, also written to bench-out/faults.json.
"""

from __future__ import annotations

import pytest

from tests.faults import tally
from tests.swarm.conftest import corpus, swarm  # noqa: F401  (real loopback swarms, as in tests/swarm)


@pytest.fixture
def fault(request):
    """Marks a test as one fault of the suite; its name is the test's id."""
    return request.node.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "fault" in getattr(item, "fixturenames", ()) and (
            report.when == "call" or (report.when == "setup" and report.failed)):
        tally.faults[item.name] = "survived" if report.passed else "FAILED"
    if report.when == "teardown" and hasattr(item.config, "workerinput"):
        # a pytest-xdist worker: the tally travels with the report to the printing process
        report.user_properties.append((tally.REPORT_PROPERTY, tally.drain()))

