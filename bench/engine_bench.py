"""Engine benchmark (DESIGN §8): the plan stage's time and peak memory — canonicalising both sides' API
frames, then diff + resolve + plan.

Scenarios, each in a fresh process so peak memory (max RSS) belongs to that scenario alone:
- full reconcile of 100,000 and 1,000,000 linked leads (every record on both sides compared);
- a 10,000-change window against a 1,000,000-record baseline.
Targets: 1M full reconcile under 15 s and 2.5 GB peak; the 10k window under 1 s. The peak is the stage's own
(its inputs, read back from parquet as the task reads them, plus what it allocates), measured after resetting
the process's high-water mark once the synthetic inputs are generated.

Run: ``make bench`` (or ``.venv/bin/python bench/engine_bench.py [scenario]``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

SCENARIOS = {
    "full-100k": dict(n=100_000, window=None),
    "full-1M": dict(n=1_000_000, window=None),
    "window-10k-of-1M": dict(n=1_000_000, window=10_000),
}


def run(name: str) -> dict:
    import pandas as pd

    from mdsync.canonical import canonical_frame, to_dynamics, to_marketo
    from mdsync.config import Side, load_config
    from mdsync.plan import plan_entity
    from mdsync.synthetic import changed_window, linked_population

    spec = SCENARIOS[name]
    entity = load_config().entity("lead")
    pop = linked_population(entity, spec["n"])
    if spec["window"] is None:
        # 1% changed in Marketo, 1% in Dynamics, 0.2% on both sides (collisions); both sides report everyone.
        n = spec["n"]
        m_rows, d_rows = changed_window(pop, n // 100, n // 100, n // 500)
        marketo = pop.marketo.copy()
        marketo.loc[m_rows.index] = m_rows
        dynamics = pop.dynamics.copy()
        dynamics.loc[d_rows.index] = d_rows
    else:
        w = spec["window"]
        marketo, dynamics = changed_window(pop, w * 4 // 10, w * 4 // 10, w * 2 // 10)
    # what the plan stage reads: each side's values as its API returns them (API names and types)
    raw_m = pd.DataFrame({f.marketo: to_marketo(marketo[f.name], f) for f in entity.fields if f.name in marketo},
                         index=marketo.index)
    raw_d = pd.DataFrame({f.dynamics: to_dynamics(dynamics[f.name], f) for f in entity.fields if f.name in dynamics},
                         index=dynamics.index)
    del marketo, dynamics
    raw_m, raw_d = _via_parquet(raw_m), _via_parquet(raw_d)  # typed as the stage reads them from staging
    pop.marketo = pop.dynamics = None  # the stage holds the API frames and the baseline, not the generator's
    rss_before_mb = _current_rss_mb()
    generator_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _reset_peak()  # from here the peak is the stage's: its inputs plus what diff + resolve + plan allocate
    start = time.perf_counter()
    marketo, _ = canonical_frame(raw_m, entity.fields, Side.MARKETO)
    dynamics, _ = canonical_frame(raw_d, entity.fields, Side.DYNAMICS)
    canonical_s = time.perf_counter() - start
    plan = plan_entity(entity, pop.baseline, marketo, dynamics, pop.links)
    elapsed = time.perf_counter() - start
    peak_mb = _peak_mb()
    return {"scenario": name, "records": spec["n"], "fields": len(entity.fields), "seconds": round(elapsed, 3),
            "canonical_seconds": round(canonical_s, 3),
            "peak_rss_mb": round(peak_mb),
            "inputs_rss_mb": round(rss_before_mb), "generator_peak_mb": round(generator_peak_mb), **plan.summary()}


def _via_parquet(frame):
    import io

    import pandas as pd

    buf = io.BytesIO()
    frame.to_parquet(buf)
    buf.seek(0)
    return pd.read_parquet(buf)


def _reset_peak() -> None:
    """Reset the process's peak RSS (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] != "all":
        print(json.dumps(run(sys.argv[1])))
        return 0
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'scenario':<18} {'records':>9} {'seconds':>8} {'canon s':>8} {'peak MB':>8} {'inputs MB':>9} {'to Dyn':>7} {'to Mkto':>7} {'collisions':>10}")
    for name in SCENARIOS:
        out = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<18} {r['records']:>9,} {r['seconds']:>8.2f} {r['canonical_seconds']:>8.2f} {r['peak_rss_mb']:>8,} {r['inputs_rss_mb']:>9,} "
              f"{r['dynamics_fields']:>7,} {r['marketo_fields']:>7,} {r['collisions']:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
