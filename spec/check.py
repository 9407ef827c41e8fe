#!/usr/bin/env python3
"""Run every Spin check of spec/ember.pml: the properties and the mutants.

Usage:
    python3 spec/check.py                 # everything, 2 jobs in parallel
    python3 spec/check.py --jobs 1        # sequentially
    python3 spec/check.py --only safety-nr3-early mutant-no-fencing
    python3 spec/check.py --list          # show the runs and their commands
    python3 spec/check.py --trail mutant-accept-busy   # print the counterexample

Each run is built in a fresh temporary directory (never in the repository):
    spin -a <defines> ember.pml
    gcc -O1 -w <defines> -DMEMLIM=<MB> -o pan pan.c     (SPIN_OPT=-O2 to change)
    ./pan <args>
A property run passes when pan reports "errors: 0" after a *complete*
exhaustive search; a mutant run passes when pan finds a counterexample
(errors > 0, a trail is written).

Requires `spin` (Debian package `spin`) and a C compiler (`gcc`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent
MODEL = SPEC_DIR / "ember.pml"

MEMLIM_MB = 3000            # per pan process; two run in parallel
# gcc -O1, not -O2: on the loaded 2-core machine gcc -O2 took 59 s for one
# pan.c and -O1 6.4 s (README "Measured with eviction"); pan itself is only a
# little slower, and the compile is most of the suite's time.
OPT = os.environ.get("SPIN_OPT", "-O1")
HASH_BITS = "-w25"          # 2^25 slots; the largest run stores ~8.5M states
SAFETY = ["-DSAFETY", "-DNOCLAIM"]   # assertions + invalid end states
LTL = ["-DNFAIR=3"]
LTL_DEPTH = "-m1000000"     # nested DFS with fairness goes deep


def bounds(nr: int = 2, lf: int = 0, wf: int = 0, drop: int = 0, early: int = 0,
           election: bool = False, evict: int = 0, prewarm: int = 0,
           no_evict_check: bool = False) -> list[str]:
    """-D flags for the model's bounds (see README "Bounds").  `evict` and
    `prewarm` bound the leader's policy actions (R13, R14); 0 leaves them out,
    so the runs without them explore exactly the states they did before."""
    flags = [f"-DNR={nr}", f"-DMAX_LFAULT={lf}", f"-DMAX_WFAULT={wf}",
             f"-DMAX_DROP={drop}", f"-DMAX_EARLY={early}"]
    if evict:
        flags.append(f"-DMAX_EVICT={evict}")
    if prewarm:
        flags.append(f"-DMAX_PREWARM={prewarm}")
    if no_evict_check:
        flags.append("-DNO_EVICT_CHECK")
    if election:
        flags.append("-DINITIAL_ELECTION")
    return flags


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    kind: str                 # "property" (expect no error), "mutant" (expect a trail), or
                              # "finding" (a known flaw of the protocol: expect its trail)
    checks: str               # what it checks, for the report
    defines: tuple[str, ...]
    pan_args: tuple[str, ...]

    @property
    def expect_error(self) -> bool:
        return self.kind in ("mutant", "finding")

    def commands(self) -> list[str]:
        d = " ".join(self.defines)
        return [f"spin -a {d} ember.pml",
                f"gcc {OPT} -w {d} -DMEMLIM={MEMLIM_MB} -o pan pan.c",
                "./pan " + " ".join(self.pan_args)]


def _safety(name: str, checks: str, **kw) -> Run:
    return Run(name, "property", checks, tuple(SAFETY + bounds(**kw)),
               ("-m10000", HASH_BITS))


def _ltl(name: str, claim: str, checks: str, fair: bool = False, **kw) -> Run:
    args = [LTL_DEPTH, HASH_BITS, "-a"] + (["-f"] if fair else []) + ["-N", claim]
    return Run(name, "property", checks, tuple(LTL + bounds(**kw)), tuple(args))


def _mutant(name: str, flag: str | None, checks: str, claim: str | None = None,
            fair: bool = False, kind: str = "mutant", **kw) -> Run:
    flags = [f"-D{flag}"] if flag else []
    if claim is None:
        defines = [*flags, *SAFETY, *bounds(**kw)]
        args = ["-m10000", HASH_BITS]
    else:
        defines = [*flags, *LTL, *bounds(**kw)]
        args = [LTL_DEPTH, HASH_BITS, "-a"] + (["-f"] if fair else []) + ["-N", claim]
    return Run(name, kind, checks, tuple(defines), tuple(args))


SAFE = "(a) (b) (c) (d) (f)"
POLICY = "(a) (b) (c) (d) (f) (g) (h) (i)"
RUNS: list[Run] = [
    # ---- safety (a)-(d): exhaustive, one run per fault combination ----------
    _safety("safety-nr3-early", SAFE + " 3 requests, 1 early timer", nr=3, early=1),
    _safety("safety-nr3-leader-worker", SAFE + " 3 requests, leader + worker fault",
            nr=3, lf=1, wf=1),
    _safety("safety-nr3-leader-drop", SAFE + " 3 requests, leader fault + 1 drop",
            nr=3, lf=1, drop=1),
    _safety("safety-nr3-worker-drop", SAFE + " 3 requests, worker fault + 1 drop",
            nr=3, wf=1, drop=1),
    _safety("safety-nr2-early-worker-drop", SAFE + " 2 requests, early timer + worker + drop",
            nr=2, wf=1, drop=1, early=1),
    _safety("safety-nr2-all", SAFE + " 2 requests, leader + worker + drop",
            nr=2, lf=1, wf=1, drop=1),
    _safety("safety-nr2-early-leader", SAFE + " 2 requests, early timer + leader fault",
            nr=2, lf=1, early=1),
    _safety("safety-nr2-two-failovers", SAFE + " 2 requests, 2 leader faults",
            nr=2, lf=2),
    _safety("safety-nr2-election-all", SAFE + " 2 requests, initial election + all faults",
            nr=2, lf=1, wf=1, drop=1, election=True),
    # F4: two probes in flight need two early timers (a timer on `timeout`
    # finds every answer delivered).  3 requests with 2 early timers is ~24M
    # states (README), so this run uses 2 requests and (f), the cause of the
    # (b) violation F4 led to.
    _safety("safety-nr2-early2", SAFE + " 2 requests, 2 early timers (two probes in flight, F4)",
            nr=2, early=2),
    # ---- liveness and (e) no leak: LTL -------------------------------------
    _ltl("ltl-live-nr2-all", "p_live", "liveness: every request completes or errors",
         nr=2, lf=1, wf=1, drop=1),
    _ltl("ltl-live-ok-nr2-all", "p_live_ok", "liveness: fault-free runs have no errors",
         nr=2, lf=1, wf=1, drop=1),
    _ltl("ltl-noleak-nr2-all", "p_noleak", "(e) journal, workers, leader table converge",
         nr=2, lf=1, wf=1, drop=1),
    _ltl("ltl-live-nr3-early", "p_live", "liveness, 3 requests, early timer",
         nr=3, early=1),
    _ltl("ltl-live-ok-nr3-early", "p_live_ok", "liveness-ok, 3 requests, early timer",
         nr=3, early=1),
    _ltl("ltl-noleak-nr3-early", "p_noleak", "(e), 3 requests, early timer",
         nr=3, early=1),
    _ltl("ltl-noleak-fair-nr2-leader-drop", "p_noleak", "(e) under weak fairness",
         fair=True, nr=2, lf=1, drop=1),
    # F5: an early probe's write-off plus a lost message leaves an orphan
    _ltl("ltl-noleak-nr2-early-drop", "p_noleak", "(e), early timer + 1 drop (F5)",
         nr=2, early=1, drop=1),
    _ltl("ltl-live-nr2-early-drop", "p_live", "liveness, early timer + 1 drop",
         nr=2, early=1, drop=1),
    # ---- eviction (R13) and pre-warm (R14): (g) (h) (i) ----------------------
    _safety("safety-nr3-evict-prewarm", POLICY + " 3 requests, 2 evictions + pre-warm",
            nr=3, evict=2, prewarm=1),
    _safety("safety-nr3-evict-leader", POLICY + " 3 requests, eviction + pre-warm + leader fault",
            nr=3, lf=1, evict=1, prewarm=1),
    _safety("safety-nr2-evict-all", POLICY + " 2 requests, eviction + pre-warm + leader + worker + drop",
            nr=2, lf=1, wf=1, drop=1, evict=1, prewarm=1),
    # with an early timer (h) does not hold (F7, the finding runs below): this
    # run checks everything else, (g) above all, with DESTROYs racing INVOKEs
    _safety("safety-nr2-early-evict", "(a) (b) (c) (d) (f) (g) (i) 2 requests, early timer + "
            "eviction + pre-warm, (h) left out (F7)",
            nr=2, early=1, evict=1, prewarm=1, no_evict_check=True),
    _ltl("ltl-noleak-nr2-evict-drop", "p_noleak", "(e) with eviction + pre-warm, leader fault + drop",
         nr=2, lf=1, drop=1, evict=1, prewarm=1),
    _ltl("ltl-live-nr2-evict-drop", "p_live", "liveness with eviction + pre-warm, leader fault + drop",
         nr=2, lf=1, drop=1, evict=1, prewarm=1),
    _ltl("ltl-live-ok-nr2-prewarm", "p_live_ok", "liveness-ok with pre-warm (no eviction: it burns ids)",
         nr=2, lf=1, drop=1, prewarm=1),
    # ---- mutants: each must yield a counterexample -------------------------
    _mutant("mutant-no-fencing", "MUTANT_NO_FENCING", "(d) fencing", nr=2, lf=1),
    _mutant("mutant-accept-busy", "MUTANT_ACCEPT_BUSY", "(a) one invocation per sandbox",
            nr=2, early=1),
    _mutant("mutant-no-reconcile", "MUTANT_NO_RECONCILE", "(d) fencing / reconciliation",
            nr=2, lf=1),
    _mutant("mutant-resend-payload", "MUTANT_RESEND_PAYLOAD", "(c) at most once",
            nr=2, drop=1),
    _mutant("mutant-no-incarnation", "MUTANT_NO_INCARNATION",
            "(f), the first step to a (b) violation", nr=3, wf=1),
    _mutant("mutant-stale-probe", "MUTANT_STALE_PROBE",
            "(f), the first step to a (b) violation", nr=3, early=1),
    _mutant("mutant-no-probe-number", "MUTANT_NO_PROBE_NUMBER",
            "(f) no write-off of a running sandbox (F4)", nr=2, early=2),
    # LTL mutants run without -f: their counterexamples end in a state where
    # every process is blocked (stutter-extended), which is trivially fair;
    # Spin's -f search does not report such stutter counterexamples.
    _mutant("mutant-no-probe", "MUTANT_NO_PROBE", "(e) no leak", claim="p_noleak",
            nr=2, drop=1),
    _mutant("mutant-unfenced-journal", "MUTANT_UNFENCED_JOURNAL", "(e) no leak",
            claim="p_noleak", nr=2, lf=1, wf=1),
    _mutant("mutant-no-client-timeout", "MUTANT_NO_CLIENT_TIMEOUT", "liveness",
            claim="p_live", nr=2, drop=1),
    _mutant("mutant-no-full-probe", "MUTANT_NO_FULL_PROBE", "(e) no leak (F5)",
            claim="p_noleak", nr=2, early=1, drop=1),
    _mutant("mutant-destroy-any", "MUTANT_DESTROY_ANY", "(g) no invocation lost to a DESTROY",
            nr=2, early=1, evict=1, no_evict_check=True),
    _mutant("mutant-evict-granted", "MUTANT_EVICT_GRANTED", "(h) no eviction of a busy or leased sandbox",
            nr=2, evict=1),
    _mutant("mutant-prewarm-herd", "MUTANT_PREWARM_HERD", "(i) herd bound",
            nr=2, prewarm=1),
    # ---- findings: flaws of the protocol as it stands (README, F7) ----------
    # The unmutated model gives these counterexamples; they stay here so the
    # trail is one command away, and turn into property runs once F7 is fixed.
    _mutant("finding-f7-evict-after-early-probe", None,
            "(h) broken: an early probe's stale 'idle' lets the leader evict a sandbox "
            "whose INVOKE is in flight", nr=2, early=1, evict=1, kind="finding"),
    _mutant("finding-f7-concurrency", None,
            "(b) broken the same way: the evicted sandbox runs, two cold starts refill",
            nr=3, early=1, evict=1, no_evict_check=True, kind="finding"),
]
BY_NAME = {r.name: r for r in RUNS}


@dataclasses.dataclass
class Result:
    run: Run
    errors: int | None = None
    states: int | None = None
    pan_seconds: float | None = None
    wall_seconds: float = 0.0
    complete: bool = False
    message: str = ""
    output: str = ""
    trail: str = ""

    @property
    def ok(self) -> bool:
        if self.errors is None:
            return False
        if self.run.expect_error:
            return self.errors > 0
        return self.errors == 0 and self.complete

    @property
    def verdict(self) -> str:
        if self.errors is None:
            return "BROKEN"
        if self.run.kind == "finding":
            return "FINDING (trail)" if self.errors > 0 else "GONE (fixed?)"
        if self.run.expect_error:
            return "KILLED (trail)" if self.errors > 0 else "SURVIVED"
        if self.errors > 0:
            return "VIOLATED"
        return "HOLDS" if self.complete else "INCOMPLETE"


def tools_missing() -> list[str]:
    return [t for t in ("spin", "gcc") if shutil.which(t) is None]


def _trail_events(workdir: Path, run: Run) -> str:
    """Replay the trail and keep the model's printf event log."""
    p = subprocess.run(["spin", *run.defines, "-t", "ember.pml"], cwd=workdir,
                       capture_output=True, text=True, timeout=120)
    keep = []
    for line in p.stdout.splitlines():
        s = line.strip()
        if (re.match(r"^[a-z]+_[a-z_]+\b", s) and " = " not in s) or s.startswith("spin:"):
            keep.append(s)
    return "\n".join(keep)


class Builds:
    """pan binaries by defines: runs that differ only in pan's arguments (the LTL runs of one
    bound, one per claim) compile once.  Built in a temp dir that `close` removes."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ember-pan-")
        self._lock = threading.Lock()
        self._built: dict[tuple[str, ...], tuple[threading.Lock, list]] = {}

    def pan(self, defines: tuple[str, ...]) -> tuple[Path | None, str]:
        with self._lock:
            entry = self._built.setdefault(defines, (threading.Lock(), []))
        lock, out = entry
        with lock:
            if not out:
                out.append(_build(defines, Path(tempfile.mkdtemp(dir=self._tmp.name))))
        return out[0]

    def close(self) -> None:
        self._tmp.cleanup()


def _build(defines: tuple[str, ...], wd: Path) -> tuple[Path | None, str]:
    shutil.copy(MODEL, wd / "ember.pml")
    steps = [
        ["spin", "-a", *defines, "ember.pml"],
        ["gcc", OPT, "-w", *defines, f"-DMEMLIM={MEMLIM_MB}", "-o", "pan", "pan.c"],
    ]
    for cmd in steps:
        p = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            return None, f"{cmd[0]} failed: {p.stdout[-2000:]}{p.stderr[-2000:]}"
    return wd / "pan", ""


def run_one(run: Run, timeout: float = 900.0, want_trail: bool = False,
            builds: Builds | None = None) -> Result:
    res = Result(run)
    t0 = time.monotonic()
    own = builds is None
    if own:
        builds = Builds()
    try:
        return _run_one(run, timeout, want_trail, builds, res, t0)
    finally:
        if own:
            builds.close()


def _run_one(run: Run, timeout: float, want_trail: bool, builds: Builds, res: Result,
             t0: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="ember-spin-") as tmp:
        wd = Path(tmp)
        shutil.copy(MODEL, wd / "ember.pml")
        pan, err = builds.pan(run.defines)
        if pan is None:
            res.message = err
            res.wall_seconds = time.monotonic() - t0
            return res
        shutil.copy(pan, wd / "pan")
        try:
            p = subprocess.run(["./pan", *run.pan_args], cwd=wd, capture_output=True,
                               text=True, timeout=timeout)
            out = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            res.message = f"pan timed out after {timeout}s"
            res.output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            res.wall_seconds = time.monotonic() - t0
            return res
        res.output = out
        m = re.search(r"errors: (\d+)", out)
        res.errors = int(m.group(1)) if m else None
        m = re.search(r"(\d+(?:\.\d+)?(?:e\+\d+)?) states, stored", out)
        res.states = int(float(m.group(1))) if m else None
        m = re.search(r"pan: elapsed time ([\d.e+]+) seconds", out)
        res.pan_seconds = float(m.group(1)) if m else None
        res.complete = ("Search not completed" not in out and "reached -DMEMLIM" not in out
                        and "max search depth too small" not in out)
        m = re.search(r"^pan:\d+: (.*)$", out, re.M)
        if m:
            res.message = m.group(1)
        elif not res.complete:
            res.message = "search not completed"
        if want_trail and (wd / "ember.pml.trail").exists():
            res.trail = _trail_events(wd, run)
    res.wall_seconds = time.monotonic() - t0
    return res


def run_all(runs: list[Run], jobs: int = 2, want_trail: bool = False,
            report=None) -> list[Result]:
    results: dict[str, Result] = {}
    builds = Builds()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            futs = {ex.submit(run_one, r, want_trail=want_trail, builds=builds): r for r in runs}
            for f in concurrent.futures.as_completed(futs):
                res = f.result()
                results[res.run.name] = res
                if report:
                    report(res)
    finally:
        builds.close()
    return [results[r.name] for r in runs]


def fmt(res: Result) -> str:
    st = f"{res.states:,}" if res.states is not None else "-"
    ps = f"{res.pan_seconds:.1f}s" if res.pan_seconds is not None else "-"
    return (f"{res.run.name:34} {res.verdict:15} states={st:>11}  pan={ps:>7}  "
            f"wall={res.wall_seconds:5.1f}s  {res.run.checks}"
            + (f"\n{'':34} -> {res.message}" if res.message else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("SPIN_JOBS", "2")))
    ap.add_argument("--only", nargs="*", help="run names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the runs and their commands")
    ap.add_argument("--trail", action="store_true", help="print counterexample event logs")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown results table")
    a = ap.parse_args(argv)

    runs = RUNS if not a.only else [BY_NAME[n] for n in a.only]
    if a.list:
        for r in runs:
            print(f"{r.name}  [{r.kind}] {r.checks}")
            for c in r.commands():
                print(f"    {c}")
        return 0
    missing = tools_missing()
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install -y spin gcc)", file=sys.stderr)
        return 2
    t0 = time.monotonic()

    def report(res: Result) -> None:
        print(fmt(res), flush=True)
        for c in res.run.commands():
            print(f"{'':34}    $ {c}")
        if a.trail and res.trail:
            print("\n".join("      | " + x for x in res.trail.splitlines()))

    results = run_all(runs, jobs=a.jobs, want_trail=a.trail, report=report)
    if a.markdown:
        print()
        for r in results:
            d = " ".join(x for x in r.run.defines)
            st = f"{r.states:,}" if r.states is not None else "-"
            ps = f"{r.pan_seconds:.1f} s" if r.pan_seconds is not None else "-"
            print(f"| `{r.run.name}` | {r.run.checks} | `{d}` | `{' '.join(r.run.pan_args)}` "
                  f"| {r.verdict} | {st} | {ps} |")
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} as expected, "
          f"total wall time {time.monotonic() - t0:.1f}s with {a.jobs} job(s)")
    for r in bad:
        print(f"UNEXPECTED: {r.run.name}: {r.verdict} {r.message}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
