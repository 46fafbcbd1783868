"""Build the optional Cython fast path; fall back to pure Python when it cannot be built.

The extensions are compiled from the same `*_py.py` sources as the pure-Python twins, with
a `*_c.pxd` beside each adding C types (the aiohttp reader approach), so both twins share
one implementation. RDSPROXY_PURE_PYTHON=1 skips the build entirely.
"""
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

FASTPATH_MODULES = ["relay", "pg_framing", "pool", "pg_keywords", "ledger", "pg_relay",
                    "mysql_framing", "mysql_relay", "pg_statements"]
# Written in Cython itself (system calls the pure twin makes through the event loop), and
# built only where they compile: the client-socket reactor needs Linux's epoll.
NATIVE_MODULES = ["reactor"] if sys.platform.startswith("linux") else []


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
            return
        self._strip(self.get_ext_fullpath(ext.name))

    def _strip(self, path):
        """Drop the debug symbols `-g` put in: they are most of the file and no use to a user.

        Done after the build rather than with a link flag so that an up-to-date extension
        build_ext skips relinking is stripped too. `build_ext --debug` or
        RDSPROXY_DEBUG_BUILD=1 keeps them (for gdb or perf).
        """
        strip = shutil.which("strip")
        if (self.debug or os.environ.get("RDSPROXY_DEBUG_BUILD", "") not in ("", "0")
                or strip is None or not os.path.exists(path)):
            return
        # -x (local symbols) is what macOS's strip accepts for a loadable module.
        flag = "-x" if sys.platform == "darwin" else "--strip-unneeded"
        self.spawn([strip, flag, path])

    @staticmethod
    def _warn(exc):
        print(f"rdsproxy: Cython fast path not built ({exc}); using the pure-Python twins",
              file=sys.stderr)


def fastpath_extensions():
    if os.environ.get("RDSPROXY_PURE_PYTHON", "") not in ("", "0"):
        print("rdsproxy: RDSPROXY_PURE_PYTHON is set, building no extensions", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        print("rdsproxy: Cython not available; using the pure-Python twins", file=sys.stderr)
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    extensions = []
    sources = [(name, f"rdsproxy/_fastpath/{name}_py.py") for name in FASTPATH_MODULES]
    sources += [(name, f"rdsproxy/_fastpath/{name}_c.pyx") for name in NATIVE_MODULES]
    # Every module's C depends on the layouts it cimports (the relay's on the scanner's and
    # the pool's, the reactor's on the relay's): a stale one would read fields at the wrong
    # offsets. Any newer .pxd regenerates them all; it costs seconds.
    pxds = [os.path.join("rdsproxy/_fastpath", f"{name}_c.pxd") for name in FASTPATH_MODULES]
    pxds = [p for p in pxds if os.path.exists(os.path.join(here, p))]
    for name, source in sources:
        if not os.path.exists(os.path.join(here, source)):
            continue
        # The module is named *_c but compiled from *_py.py: Cython then looks for the pxd
        # by the module name (*_c.pxd) and names the init function PyInit_<name>_c.
        ext = Extension(f"rdsproxy._fastpath.{name}_c", [source], depends=pxds)
        generated = os.path.join(here, source.rsplit(".", 1)[0] + ".c")
        try:
            extensions += cythonize(
                [ext],
                compiler_directives={
                    "language_level": "3",
                    # Only pointers are indexed unchecked; keep bytearray lookups checked.
                    "boundscheck": True,
                    "wraparound": False,
                    "cdivision": True,
                    # `if cython.compiled:` leaves the pure branch unreachable on purpose.
                    "warn.unreachable": False,
                },
                # Cython's dependency scan looks for <source>.pxd (*_py.pxd), so it would
                # miss edits to *_c.pxd: regenerate the C file when a pxd is newer.
                force=any(_newer(os.path.join(here, p), generated) for p in pxds),
                quiet=True,
            )
        except Exception as exc:
            print(f"rdsproxy: cythonize {source} failed ({exc}); using the pure-Python twin",
                  file=sys.stderr)
    return extensions


def _newer(path, than):
    """True when `path` exists and `than` is missing or older."""
    if not os.path.exists(path):
        return False
    return not os.path.exists(than) or os.path.getmtime(path) > os.path.getmtime(than)


setup(ext_modules=fastpath_extensions(), cmdclass={"build_ext": OptionalBuildExt})
