"""pytest: the tests import the project's modules from the checkout's root (as `python test_all.py` does)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
