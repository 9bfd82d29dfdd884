"""The whole test suite: `python test_all.py` (CPU, a few minutes) or `pytest`.

The tests live in tests/, one file per stage (test_core.py: mask, model, diffusion). Run directly, this file runs
every `test_*` function of every tests/test_*.py, prints one line per test and ends with `N passed, N failed`
(exit code 1 on any failure). `python test_all.py mask kv` runs only the tests whose name contains one of the words.
"""
import glob
import importlib
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(ROOT, "tests")


def _collect(filters):
    sys.path[:0] = [ROOT, TESTS]
    tests = []
    for path in sorted(glob.glob(os.path.join(TESTS, "test_*.py"))):
        module = importlib.import_module(os.path.basename(path)[:-3])
        for attr, fn in vars(module).items():
            if attr.startswith("test_") and callable(fn) and getattr(fn, "__module__", None) == module.__name__:
                if not filters or any(f in attr for f in filters):
                    tests.append((f"{module.__name__}.{attr}", fn))
    return tests


def main(filters):
    passed, failed = 0, []
    for name, fn in _collect(filters):
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
        except Exception:
            failed.append(name)
            print(f"FAIL {name} ({time.time() - start:.1f}s)\n{traceback.format_exc()}", flush=True)
    for name in failed:
        print(f"failed: {name}")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
