"""What both engines' relay halves share: the clock, the C write and the half's base class.

Pure-Python twin of `relay_c`, which setup.py compiles from this very file with
`relay_c.pxd`. The C reactor (reactor_c.pyx) knows one kind of protocol of its own, a
RelayHalf: it hands each chunk it reads to the half's `received` as a C call (a vtable
slot, no method lookup) and writes through Wire.write in C. PostgreSQL's halves
(pg_relay) and MySQL's (mysql_relay) derive from RelayHalf; the engines' Python session
classes derive from those.
"""
from time import monotonic as _monotonic

try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used. Bound
    # through globals() because Cython reserves the name `cython` (no rebinding allowed).
    globals()["cython"] = type("cython", (), {"compiled": False})


def now():
    """The monotonic clock the latencies are measured on, in seconds: compiled, a
    clock_gettime call (relay_c.pxd) instead of a Python call per reading."""
    if cython.compiled:
        return c_monotonic()  # noqa: F821 (declared in relay_c.pxd)
    return _monotonic()


class Wire:
    """A transport the compiled relay writes to with a C call: the C reactor's FdTransport
    derives from this class (relay_c.pxd), so a chunk's write skips the method lookup
    and argument parsing of `transport.write`. Nothing derives from it in pure Python."""

    def write(self, data):
        raise NotImplementedError


def wire_write(transport, data):
    """transport.write(data), as a C call when the transport is a Wire."""
    if isinstance(transport, Wire):
        wire = transport   # compiled: a typed Wire local (relay_c.pxd)
        wire.write(data)
    else:
        transport.write(data)


class RelayHalf:
    """One side of a relayed session, as an asyncio protocol whose chunks the C reactor
    hands to `received` directly. Subclasses define received(); data_received is only the
    loop's way in (a subclass that overrides it is served as any other protocol)."""

    def data_received(self, data):
        self.received(data)

    def received(self, data):
        raise NotImplementedError

    def connection_lost(self, exc):
        pass


def bind_base(namespace):
    """Give an uncompiled relay module (pg_relay_py, mysql_relay_py) the base's names.
    Compiled, that module cimports them (its .pxd: C calls, a C base class), and Cython
    allows no Python assignment to such names, hence a namespace filled from here."""
    namespace.update(RelayHalf=RelayHalf, now=now, wire_write=wire_write)
