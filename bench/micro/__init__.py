"""Micro-benchmarks of the fast path: each `_fastpath` twin pair, pure Python against Cython.

Charter: time the per-chunk work of every twinned module (`rdsproxy/_fastpath/<name>_py.py`
and its compiled `<name>_c`) on realistic inputs (bench/micro/traffic.py), both twins in one
process, with pytest-benchmark; `python3 -m bench.micro` runs them and prints the
Cython/pure ratio per component (bench/micro/__main__.py).

A benchmark is one function in bench/micro/cases.py decorated with `@case(component, label)`:
given the twins of one implementation (`Twins`), it builds its inputs, checks one run of
its body gives the expected result, and returns the body. That decorator is the whole
registration: the pytest-benchmark run, tests/test_micro_bench.py (every body once, both
twins) and the report all read `CASES`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

IMPLS = ("py", "c")   # pure Python first: the ratio is pure time / Cython time


class Twins:
    """`twins.pool` is rdsproxy._fastpath.pool_<impl>: one implementation of every module,
    so that a case combining several (the relay's halves with a pool core and scanners)
    never mixes a compiled class with a pure one."""

    def __init__(self, impl: str):
        self.impl = impl

    def __getattr__(self, name: str):
        module = importlib.import_module(f"rdsproxy._fastpath.{name}_{self.impl}")
        setattr(self, name, module)
        return module


@dataclass(frozen=True)
class Case:
    component: str                         # the twinned module measured, e.g. "pg_framing"
    label: str                             # what one call of the body does
    build: Callable[[Twins], Callable[[], object]]

    @property
    def id(self) -> str:
        return f"{self.component}: {self.label}"


CASES: list[Case] = []


def case(component: str, label: str):
    """Register a benchmark of `component` (see the module doc)."""
    def register(build):
        CASES.append(Case(component, label, build))
        return build
    return register


def missing_c() -> list[str]:
    """The components of CASES whose compiled twin does not import here."""
    missing = []
    for component in sorted({c.component for c in all_cases()}):
        try:
            importlib.import_module(f"rdsproxy._fastpath.{component}_c")
        except ImportError:
            missing.append(component)
    return missing


def all_cases() -> list[Case]:
    importlib.import_module(f"{__name__}.cases")   # registers them
    return CASES
