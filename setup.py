"""Build the optional Cython fast path; fall back to pure Python when it cannot be built.

The extensions are compiled from the same `*_py.py` sources as the pure-Python twins, with
a `*_c.pxd` beside each adding C types (the aiohttp reader approach), so both twins share
one implementation. RDSPROXY_PURE_PYTHON=1 skips the build entirely.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

FASTPATH_MODULES = ["framing", "pool"]


class OptionalBuildExt(build_ext):
    """A build_ext that turns a compiler failure into a warning (pure Python still works)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers, ...
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        print(f"rdsproxy: Cython fast path not built ({exc}); using the pure-Python twins",
              file=sys.stderr)


def fastpath_extensions():
    if os.environ.get("RDSPROXY_PURE_PYTHON") == "1":
        print("rdsproxy: RDSPROXY_PURE_PYTHON=1, building no extensions", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        print("rdsproxy: Cython not available; using the pure-Python twins", file=sys.stderr)
        return []
    extensions = []
    for name in FASTPATH_MODULES:
        source = f"rdsproxy/_fastpath/{name}_py.py"
        if not os.path.exists(source):
            continue
        extensions.append(Extension(f"rdsproxy._fastpath.{name}_c", [source]))
    if not extensions:
        return []
    try:
        return cythonize(
            extensions,
            compiler_directives={"language_level": "3", "boundscheck": False,
                                 "wraparound": False, "cdivision": True},
            quiet=True,
        )
    except Exception as exc:
        print(f"rdsproxy: cythonize failed ({exc}); using the pure-Python twins", file=sys.stderr)
        return []


setup(ext_modules=fastpath_extensions(), cmdclass={"build_ext": OptionalBuildExt})
