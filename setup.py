"""Build the optional C kernels (hubmerge/_kernels.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found the install still succeeds and the merge loop runs
its torch path (hubmerge/kernels.py says which one is in use).
"""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
setup(ext_modules=[Extension("hubmerge._kernels", ["hubmerge/_kernels.c"], extra_compile_args=args, optional=True)])
