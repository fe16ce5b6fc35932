"""Properties of diff + resolve + plan over random populations (hypothesis).

After the plan is applied to both sides: every synced field agrees on both sides (but for re-opt-ins that a
consent flag's ``opt_out_wins`` holds back), a second diff plans no writes (no ping-pong), each collision went
to its entity type's winner, no write carried a value the target already had, and no write ever turned an
opt-out into an opt-in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import Direction, FieldType, Side, load_config
from mdsync.diff import diff_key as compare_key
from mdsync.plan import REQUIRES_NOTHING, plan_entity
from tests.include.mdsync.conftest import links_for

CONFIG = load_config()


def apply_writes(frame: pd.DataFrame, writes: pd.DataFrame) -> pd.DataFrame:
    """The sides after the plan's writes: apply canonical writes to a canonical frame indexed by person id."""
    out = frame.copy()
    missing = pd.Index(writes["person_id"].unique()).difference(out.index)
    if len(missing):
        out = out.reindex(out.index.union(missing).rename(out.index.name))
    for name, part in writes.groupby("field", sort=False):
        if name not in out.columns:
            out[name] = pd.Series(np.nan, index=out.index, dtype=CANONICAL_DTYPE)
        out.loc[part["person_id"].to_numpy(), name] = part["value"].to_numpy()
    return out


def apply_baseline_updates(baseline: pd.DataFrame, updates: pd.DataFrame, succeeded: set[str]) -> pd.DataFrame:
    """Advance a wide baseline frame with the updates whose required write is in ``succeeded``."""
    ok = updates["requires"].isin(list(succeeded | {REQUIRES_NOTHING}))
    return apply_writes(baseline, updates.loc[ok.to_numpy(dtype=bool)])


def _choices(field) -> list[str | None]:
    if field.type is FieldType.EMAIL:
        return [None, "ann@x.com", "Ann@X.com", "bob@x.com"]
    if field.type is FieldType.BOOLEAN:
        return [None, "true", "false"]
    if field.type is FieldType.PICKLIST:
        return [None, *list(field.values.values())[:3]]
    return [None, "a", "A", "b", "Zoë 'q'"]


@st.composite
def populations(draw):
    entity = CONFIG.entity(draw(st.sampled_from(["lead", "contact"])))
    fields = draw(st.lists(st.sampled_from(entity.fields), min_size=1, max_size=5, unique_by=lambda f: f.name))
    n = draw(st.integers(1, 6))
    ids = list(range(1, n + 1))
    frames = {}
    for which in ("baseline", "marketo", "dynamics"):
        frames[which] = {f.name: [draw(st.sampled_from(_choices(f))) for _ in ids] for f in fields}
    # most cells unchanged on each side, so one-sided changes and collisions both occur
    for side in ("marketo", "dynamics"):
        for f in fields:
            keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            frames[side][f.name] = [b if k else v for b, v, k in zip(frames["baseline"][f.name], frames[side][f.name], keep)]
    has_baseline = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    report_all = draw(st.booleans())
    return entity, fields, ids, frames, has_baseline, report_all


def _frame(values: dict, ids) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(ids, name="person_id", dtype="int64")).astype(CANONICAL_DTYPE)


def _reported(full: pd.DataFrame, baseline: pd.DataFrame, report_all: bool) -> pd.DataFrame:
    """What a side reports in a window: every person whose values differ from the baseline (or everyone)."""
    if report_all:
        return full
    aligned = baseline.reindex(index=full.index, columns=full.columns)
    differs = ~((full == aligned).fillna(False) | (full.isna() & aligned.isna()))
    return full.loc[differs.any(axis=1)]


def _keys(frame: pd.DataFrame, fields) -> pd.DataFrame:
    return pd.DataFrame({f.name: compare_key(frame[f.name], f) for f in fields})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(populations())
def test_plan_converges_without_ping_pong(data):
    entity, fields, ids, frames, has_baseline, report_all = data
    marketo_full, dynamics_full = _frame(frames["marketo"], ids), _frame(frames["dynamics"], ids)
    baseline = _frame(frames["baseline"], ids)
    # A never-synced pair has no baseline: both sides report it in full.
    baseline = baseline.loc[np.array(has_baseline, dtype=bool)]
    if not all(has_baseline):
        report_all = True
    links = links_for(ids)
    plan = plan_entity(entity, baseline, _reported(marketo_full, baseline, report_all),
                       _reported(dynamics_full, baseline, report_all), links)

    # No write carries a value the target already has.
    for writes, target in ((plan.dynamics_writes, dynamics_full), (plan.marketo_writes, marketo_full)):
        for _, w in writes.iterrows():
            f = entity.field(w["field"])
            have = compare_key(pd.Series([target.loc[w["person_id"], f.name]], dtype=CANONICAL_DTYPE), f)
            want = compare_key(pd.Series([w["value"]], dtype=CANONICAL_DTYPE), f)
            assert not ((have.isna() & want.isna()) | (have == want).fillna(False)).iloc[0], w.to_dict()

    # Values only flow the way their field allows.
    for writes, side in ((plan.dynamics_writes, Side.DYNAMICS), (plan.marketo_writes, Side.MARKETO)):
        assert all(entity.field(name).flows_to(side) for name in writes["field"])

    # Collisions go to the entity type's winner: the loser receives the winner's value.
    winner = entity.collision_winner
    loser_writes = plan.dynamics_writes if winner is Side.MARKETO else plan.marketo_writes
    for _, c in plan.collisions.iterrows():
        assert entity.field(c["field"]).direction is Direction.BOTH
        assert c["winner"] == winner.value
        written = loser_writes[(loser_writes["person_id"] == c["person_id"]) & (loser_writes["field"] == c["field"])]
        assert written["value"].tolist() == [c[f"{winner.value}_value"]]

    # Consent flags: only an opt-out is ever written, and an opt-out on either side before the plan is still an
    # opt-out on that side after it; every re-opt-in held back has an opted-out side and a baseline opt-out.
    marketo_after = apply_writes(marketo_full, plan.marketo_writes)
    dynamics_after = apply_writes(dynamics_full, plan.dynamics_writes)
    consent = [f.name for f in fields if f.opt_out_wins]
    for writes in (plan.dynamics_writes, plan.marketo_writes):
        mine = writes[writes["field"].isin(consent)]
        assert mine["value"].eq("true").all() and mine["action"].eq("consent").all(), mine
        assert writes.loc[~writes["field"].isin(consent), "action"].eq("update").all()
    for name in consent:
        for before, after in ((marketo_full, marketo_after), (dynamics_full, dynamics_after)):
            was_out = before[name].eq("true").fillna(False)
            assert after.loc[was_out[was_out].index, name].eq("true").all()
    held = plan.consent_held
    for _, h in held.iterrows():
        assert h["baseline"] == "true" and "true" in (h["marketo_value"], h["dynamics_value"])
        assert h[f"{h['reopted']}_value"] != "true"
    assert not plan.baseline_updates.merge(held[["person_id", "field"]], on=["person_id", "field"]).shape[0]

    # Applying the plan makes both sides agree on every synced field (a held re-opt-in stays as it is).
    m_keys, d_keys = _keys(marketo_after, fields), _keys(dynamics_after, fields)
    agree = (m_keys == d_keys).fillna(False) | (m_keys.isna() & d_keys.isna())
    for _, h in held.iterrows():
        agree.loc[h["person_id"], h["field"]] = True
    assert agree.all().all(), (marketo_after, dynamics_after)

    # A second diff right after is empty, also when both sides report everything.
    baseline_after = apply_baseline_updates(baseline.reindex(columns=[f.name for f in fields]),
                                            plan.baseline_updates, {"dynamics", "marketo"})
    for reported_all in (False, True):
        again = plan_entity(entity, baseline_after, _reported(marketo_after, baseline_after, reported_all),
                            _reported(dynamics_after, baseline_after, reported_all), links)
        assert again.is_empty and again.collisions.empty, (again.dynamics_writes, again.marketo_writes)
        # the held re-opt-ins are held again, unchanged (reported when their side reports them)
        assert set(map(tuple, again.consent_held[["person_id", "field"]].values)) <= set(
            map(tuple, held[["person_id", "field"]].values))
