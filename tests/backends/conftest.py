"""Reports the differential harness's case counts in pytest's terminal summary."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    import sys

    module = sys.modules.get("test_differential")
    counts = getattr(module, "COUNTS", None)
    if not counts:
        return
    terminalreporter.section("differential harness")
    for key in ("cases", "silent wrong results", "crashes"):
        terminalreporter.write_line(f"{key}: {counts.get(key, 0)}")
    for key in sorted(k for k in counts if k not in ("cases", "silent wrong results", "crashes")):
        terminalreporter.write_line(f"{key}: {counts[key]}")
