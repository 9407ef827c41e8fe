"""Model-check the cluster load-balancer protocol (spec/ember.pml) with Spin.

Every property run must finish an exhaustive search with no error; every
mutant run must produce a counterexample, and so must every finding run (a
known flaw of the protocol, README F7: it must stay reproducible until fixed).  The runs, their bounds and the
exact commands are listed in spec/check.py (``python3 spec/check.py --list``)
and documented in spec/README.md.

Spin is required: with CI=true a missing ``spin`` (or ``gcc``) is a failure,
elsewhere the tests are skipped with a message.  Install with
``apt-get install -y spin gcc``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"


def _load_check():
    spec = importlib.util.spec_from_file_location("ember_spec_check", SPEC_DIR / "check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


check = _load_check()

pytestmark = pytest.mark.timeout(1800)


def _require_tools() -> None:
    missing = check.tools_missing()
    if not missing:
        return
    msg = (f"model checking needs {', '.join(missing)} on PATH "
           "(Debian: apt-get install -y spin gcc)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def results() -> dict:
    """Run every check once, two pan processes in parallel (2 cores)."""
    _require_tools()
    jobs = int(os.environ.get("SPIN_JOBS", "2"))
    return {r.run.name: r for r in check.run_all(check.RUNS, jobs=jobs)}


PROPERTIES = [r.name for r in check.RUNS if r.kind == "property"]
MUTANTS = [r.name for r in check.RUNS if r.kind == "mutant"]
FINDINGS = [r.name for r in check.RUNS if r.kind == "finding"]


def test_spin_is_installed() -> None:
    """Fails under CI=true when spin/gcc are missing; skips elsewhere."""
    _require_tools()


def test_runs_are_defined() -> None:
    assert len(PROPERTIES) >= 8
    flags = {d for r in check.RUNS if r.kind == "mutant" for d in r.defines}
    for required in ("-DMUTANT_NO_FENCING", "-DMUTANT_ACCEPT_BUSY", "-DMUTANT_NO_RECONCILE",
                     "-DMUTANT_NO_PROBE_NUMBER", "-DMUTANT_NO_FULL_PROBE", "-DMUTANT_DESTROY_ANY",
                     "-DMUTANT_EVICT_GRANTED", "-DMUTANT_PREWARM_HERD"):
        assert required in flags
    # F4 needs two probes in flight (two early timers), F5 an early timer together with a drop
    assert any("-DMAX_EARLY=2" in r.defines for r in check.RUNS if r.kind == "property")
    assert any({"-DMAX_EARLY=1", "-DMAX_DROP=1"} <= set(r.defines) and "-N" in r.pan_args
               and "p_noleak" in r.pan_args for r in check.RUNS if r.kind == "property")
    # issue 19: eviction and pre-warm race faults; one run has DESTROYs racing INVOKEs (early timer)
    evict = [r for r in check.RUNS if r.kind == "property" and any(d.startswith("-DMAX_EVICT=") for d in r.defines)]
    assert any("-DMAX_LFAULT=1" in r.defines and "-DMAX_WFAULT=1" in r.defines and "-DMAX_DROP=1" in r.defines
               for r in evict)
    assert any("-DMAX_EARLY=1" in r.defines for r in evict)
    assert any("p_noleak" in r.pan_args for r in evict)


@pytest.mark.parametrize("name", PROPERTIES)
def test_property_holds(results: dict, name: str) -> None:
    res = results[name]
    assert res.errors is not None, f"{name}: no verdict from pan: {res.message}\n{res.output[-3000:]}"
    assert res.complete, f"{name}: search not complete (raise the bounds budget?)\n{res.output[-3000:]}"
    assert res.errors == 0, f"{name}: {res.message}\n{res.output[-3000:]}"


@pytest.mark.parametrize("name", FINDINGS)
def test_finding_still_reproduces(results: dict, name: str) -> None:
    res = results[name]
    assert res.errors is not None, f"{name}: no verdict from pan: {res.message}\n{res.output[-3000:]}"
    assert res.errors > 0, (f"{name}: the unmutated model no longer gives this counterexample: if F7 is "
                            f"fixed, make it a property run (README)\n{res.output[-3000:]}")


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_killed(results: dict, name: str) -> None:
    res = results[name]
    assert res.errors is not None, f"{name}: no verdict from pan: {res.message}\n{res.output[-3000:]}"
    assert res.errors > 0, f"{name}: mutant survived, the checks cannot see this bug\n{res.output[-3000:]}"
