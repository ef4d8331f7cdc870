"""Runs many ``socratune`` command lines in one process (so transformers is imported once) and
reports, per case, the exit code and what went to stderr; tests/test_hostile_inputs.py starts it
as a subprocess.

    python tests/hostile_driver.py CASES.json RESULTS.json

CASES.json is a list of ``{"cwd": DIR, "argv": [...]}``; each case runs with ``cwd`` as the
working directory and stdin empty. An exception escaping ``main`` would end this process with
a traceback, which the test sees as a missing result. A case still running after CASE_SECONDS
(a reader blocked on a FIFO, a request that hangs) is stopped and reported with code "hung",
so one such case fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

CASE_SECONDS = 60


class Hung(BaseException):
    """Raised by the alarm in a case that ran past CASE_SECONDS (a BaseException: no handler in
    the code under test catches it)."""


def _hung(signum, frame):
    raise Hung


def main(cases_path: str, results_path: str) -> None:
    from socratune.cli import main as socratune_main

    results = []
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    for case in cases:
        os.chdir(case["cwd"])
        stderr, stdout = io.StringIO(), io.StringIO()
        sys.stdin = io.StringIO("")
        signal.signal(signal.SIGALRM, _hung)
        signal.alarm(CASE_SECONDS)
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                code = socratune_main(case["argv"])
        except Hung:
            code = "hung"
        finally:
            signal.alarm(0)
        results.append({"argv": case["argv"], "code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue()})
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, ensure_ascii=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
