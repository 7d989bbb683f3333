"""Only a version check, before pip resolves anything: pip does not check a local project's requires-python
before it downloads the dependencies, and then fails on one of them (grain) instead. The rest is pyproject.toml."""
import sys

if sys.version_info < (3, 11):
    sys.exit("error: zenjax needs Python >= 3.11, this is %d.%d.%d; create the virtualenv with python3.11 or "
             "newer (python3.11 -m venv .venv)" % tuple(sys.version_info[:3]))  # no f-string: old Pythons parse it

from setuptools import setup  # noqa: E402

setup()
