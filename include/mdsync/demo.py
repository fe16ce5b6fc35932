"""Engine demo: several sync cycles over generated leads and contacts, printing what would be written and why.

Runs the real engine (config, diff, collision policy, plan, state store) on generated data with edits on
both sides between cycles, including collisions on a lead and on a contact. The sides are in-memory
frames here; ``make demo`` runs this until the end-to-end sandbox demo replaces it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mdsync.config import load_config
from mdsync.plan import SyncPlan, apply_writes, plan_entity
from mdsync.state import open_store
from mdsync.synthetic import changed_window, linked_population


def _print_plan(plan: SyncPlan, limit: int = 3) -> None:
    s = plan.summary()
    print(f"  {plan.entity:<8} compared {s['compared']:>5,}  to Dynamics {s['dynamics_records']:>4} records "
          f"({s['dynamics_fields']} fields)  to Marketo {s['marketo_records']:>4} records ({s['marketo_fields']} fields)  "
          f"collisions {s['collisions']}")
    for _, c in plan.collisions.head(limit).iterrows():
        print(f"    collision person {c.person_id} {c.field}: Marketo {c.marketo_value!r} vs Dynamics "
              f"{c.dynamics_value!r} (was {c.baseline!r}) -> {c.winner} wins ({c.reason})")
    for label, writes in (("Dynamics", plan.dynamics_writes), ("Marketo", plan.marketo_writes)):
        for _, w in writes.loc[~writes["reason"].str.startswith("collision")].head(limit).iterrows():
            print(f"    update {label} person {w.person_id} {w.field}: {w.previous!r} -> {w.value!r} ({w.reason})")


def main(workdir: str | None = None) -> int:
    config = load_config()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mdsync-demo-"))
    store = open_store(f"sqlite:///{workdir / 'state.sqlite'}")
    print(f"state store: {store.url}")
    pops = {
        "lead": linked_population(config.entity("lead"), 2000, seed=1, first_id=1),
        "contact": linked_population(config.entity("contact"), 1000, seed=2, first_id=100_001),
    }
    for pop in pops.values():
        store.save_links(pop.links.reset_index().assign(method="demo"), run_id="demo-setup")
        long = pop.baseline.reset_index().melt(id_vars="person_id", var_name="field", value_name="value")
        store.save_baselines(long, run_id="demo-setup")

    echoes: dict[str, np.ndarray] = {}
    for cycle in range(1, 4):
        run_id = f"demo-cycle-{cycle}"
        print(f"\ncycle {cycle}:")
        for name, pop in pops.items():
            if cycle < 3:
                m_rows, d_rows = changed_window(pop, 20 * cycle, 15, 3, seed=cycle * 10 + len(name))
            else:  # only our own writes come back as changes on both sides: they must plan no writes
                echo = echoes[name]
                m_rows, d_rows = pop.marketo.loc[echo], pop.dynamics.loc[echo]
                print(f"    {name}: {len(echo)} records we wrote last cycle come back as changes on both sides")
            pop.marketo.loc[m_rows.index] = m_rows
            pop.dynamics.loc[d_rows.index] = d_rows
            keys = m_rows.index.union(d_rows.index)
            baseline = store.load_baselines(person_ids=keys.tolist(), fields=config.entity(name).field_names)
            plan = plan_entity(config.entity(name), baseline, m_rows, d_rows, pop.links)
            echoes[name] = np.union1d(plan.dynamics_writes["person_id"], plan.marketo_writes["person_id"])
            _print_plan(plan)
            pop.marketo = apply_writes(pop.marketo, plan.marketo_writes)
            pop.dynamics = apply_writes(pop.dynamics, plan.dynamics_writes)
            store.save_baselines(plan.baseline_updates, run_id)
            activity = pd.concat([
                plan.dynamics_writes.assign(action="update", target="dynamics"),
                plan.marketo_writes.assign(action="update", target="marketo"),
            ]).rename(columns={"previous": "old_value", "value": "new_value", "reason": "detail"})
            store.record_activity(activity.assign(entity_type=name, dynamics_type=name), run_id)
            agree = (pop.marketo.fillna("") == pop.dynamics.fillna("")).to_numpy().all()
            print(f"    after cycle {cycle}: both sides agree on every {name} field: {bool(agree)}")
            if not agree:
                return 1

    history = store.activity()
    history = history[history["detail"].str.startswith("collision")]
    print(f"\nactivity log sample ({len(store.activity())} rows in {store.url}):")
    for _, a in history.head(4).iterrows():
        print(f"  {a.run_id} person {a.person_id} {a.action} {a.field}: {a.old_value!r} -> {a.new_value!r} ({a.detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
