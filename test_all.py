"""The whole test suite: `python test_all.py` (CPU, a few minutes), pytest underneath (requirements-test.txt).

The tests live in tests/, one file per stage (test_core.py: mask, model, diffusion). This runs them all through
pytest (its fixtures: tmp_path, parametrize, raises), prints one line per test and ends with
`N passed, N failed` (exit code 1 on any failure). `python test_all.py mask kv` runs only the tests whose name
contains one of the words. `pytest` alone runs the same tests.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))


class Count:
    """A pytest plugin: one line per test as it ends, in place of pytest's progress letters (its failure reports
    follow at the end), and the counts (a setup or teardown error, or a test file that fails to import, fails)."""

    def __init__(self):
        self.passed, self.failed, self.skipped = [], [], []

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report):
        if report.when == "call" or not report.passed:  # pytest's categories, without the letter
            return report.outcome, "", report.outcome.upper()
        return "", "", ""

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)
            print(f"FAIL {report.nodeid} (collection)", flush=True)

    def pytest_runtest_logreport(self, report):
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)
            print(f"FAIL {report.nodeid} ({report.duration:.1f}s)", flush=True)
        elif report.when == "call" and report.passed:
            self.passed.append(report.nodeid)
            print(f"PASS {report.nodeid} ({report.duration:.1f}s)", flush=True)
        elif report.skipped:
            self.skipped.append(report.nodeid)


def main(filters):
    count = Count()
    args = [os.path.join(ROOT, "tests"), "-q", "-p", "no:cacheprovider", "--rootdir", ROOT]
    code = pytest.main(args + (["-k", " or ".join(filters)] if filters else []), plugins=[count])
    for name in count.failed:
        print(f"failed: {name}")
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and not count.failed:
        count.failed.append(f"pytest exit code {int(code)}")  # a collection error, or no test ran
    print(f"{len(count.passed)} passed, {len(count.failed)} failed" +
          (f", {len(count.skipped)} skipped" if count.skipped else ""))
    return 1 if count.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
