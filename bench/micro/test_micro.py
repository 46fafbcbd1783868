"""pytest-benchmark over bench/micro/cases.py: every case against both twins, in one process.

Run through `python3 -m bench.micro` (which reports the ratios), or directly with
`python3 -m pytest bench/micro`. Not part of `pytest tests`: tests/test_micro_bench.py runs
each body once there instead.
"""
import pytest

from bench.micro import IMPLS, Twins, all_cases, missing_c

CASES = all_cases()
MISSING = missing_c()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_micro(benchmark, case, impl):
    if impl == "c" and case.component in MISSING:
        pytest.skip(f"{case.component}_c is not built (python setup.py build_ext --inplace)")
    body = case.build(Twins(impl))
    benchmark.group = case.id
    benchmark.extra_info.update(component=case.component, case=case.label, impl=impl)
    benchmark(body)
