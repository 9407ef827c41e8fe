"""Microbenchmark of the sans-IO core: assign+release pairs per second on one core.

100,000 sandboxes across 10,000 functions, all warm; each pair picks a function at random
(pre-drawn), acquires a warm sandbox and releases it. The routing decision must not grow with the
number of sandboxes, so the same run also measures a table 100x smaller as a baseline and prints
the ratio. The big table is measured under the fixed keep-alive (the assigner's own default) and
under the server's default policy (`policy_from_name("default")`), which learns from every arrival
and is asked for a keep-alive on every release.
"""

from __future__ import annotations

import json
import random
import sys
import time

from ember.core.assignment import Assigner
from ember.core.keepalive import KeepAlivePolicy, policy_from_name


def build(functions: int, per_function: int, keep_alive: KeepAlivePolicy | None = None) -> Assigner:
    a = Assigner(
        account_limit=10_000_000, max_starting=per_function, max_waiting=per_function, keep_alive=keep_alive
    )
    now = 0.0
    for f in range(functions):
        name = f"fn-{f}"
        a.put_function(name, 1)
        held = [a.acquire(f"warm-{f}-{i}", name, now) for i in range(per_function)]
        for effect in a.take_effects():
            a.sandbox_ready(effect.sandbox, now)
        a.take_effects()
        for sb in a.sandboxes_of(name):
            if sb.request is not None:
                a.release(sb, now)
        assert len(held) == per_function
    assert len(a.sandboxes) == functions * per_function
    return a


def run(a: Assigner, functions: int, pairs: int, seed: int = 1) -> float:
    rnd = random.Random(seed)
    names = [f"fn-{rnd.randrange(functions)}" for _ in range(pairs)]
    ids = [f"r{i}" for i in range(pairs)]
    acquire, release = a.acquire, a.release
    now = 1.0
    t0 = time.perf_counter()
    for i in range(pairs):
        sb = acquire(ids[i], names[i], now)
        release(sb, now)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t0
    assert not a.take_effects()
    return pairs / elapsed


def main(pairs: int = 1_000_000) -> dict[str, float]:
    big = build(10_000, 10)
    small = build(100, 10)
    big_rate = max(run(big, 10_000, pairs, seed) for seed in (1, 2, 3))
    small_rate = max(run(small, 100, pairs, seed) for seed in (1, 2, 3))
    del big, small
    big_default = build(10_000, 10, policy_from_name("default"))
    default_rate = max(run(big_default, 10_000, pairs, seed) for seed in (1, 2, 3))
    result = {
        "core_pairs_per_s_100k_sandboxes": round(big_rate),
        "core_pairs_per_s_1k_sandboxes": round(small_rate),
        "core_ratio_100k_vs_1k": round(big_rate / small_rate, 3),
        "core_pairs_per_s_100k_sandboxes_default_policy": round(default_rate),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)))
