"""Generate ``schema.json`` (the sandbox's column catalogue) from the Dataverse entity reference pages.

Run ``python -m sandbox.dataverse.build_schema /work/shared/reference/dataverse/entities`` after the
reference pages change. The sandbox itself reads only the generated JSON, so it runs without the
reference folder. A realistic subset is kept: every text, memo, choice, yes/no, whole-number and
date column the sync could map, the state/status pair, the row version, the primary id, the few
lookups the lead lifecycle and merges need (with the merge / delete cascade of their relationships) and
the ``merged`` flag, and the writable money columns (account ``revenue``, ...); computed money (``*_base``),
images and internal plumbing columns are left out.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ENTITIES = ("contact", "lead", "account")
KEPT_TYPES = {"String", "Memo", "Picklist", "Boolean", "State", "Status", "Integer", "DateTime", "BigInt", "Money"}
# Lookups kept per entity (DESIGN §3 and the lead lifecycle): stored as ``_<name>_value``.
# ``masterid``: the record a merged (subordinate) record was merged into.
KEPT_LOOKUPS = {
    "contact": {"parentcustomerid", "originatingleadid", "masterid"},
    "lead": {"parentaccountid", "parentcontactid", "masterid"},
    "account": {"primarycontactid", "originatingleadid", "masterid"},
}
SKIPPED = re.compile(
    r"^(yomi|address3_|traversedpath|stageid|processid|entityimage|timezoneruleversionnumber|"
    r"utcconversiontimezonecode|importsequencenumber|overriddencreatedon|exchangerate|onholdtime|"
    r"lastonholdtime|.*_addressid$|.*_utcoffset$|.*_composite$|isprivate$|isautocreate$|"
    r"isbackofficecustomer$|participatesinworkflow$|subscriptionid$|externaluseridentifier$)"
)
# The product's link column (DESIGN §3), added to contact and lead with its alternate key.
LINK_COLUMN = {
    "logical_name": "mdsync_marketopersonid", "type": "String", "max_length": 100,
    "required_level": "None", "valid_for_create": True, "valid_for_update": True, "valid_for_read": True,
    "custom": True,
}
# The product's deleted flag (delete policy "flag"): set on a lead or contact whose Marketo person was deleted.
DELETED_FLAG_COLUMN = {
    "logical_name": "mdsync_deletedinmarketo", "type": "Boolean", "required_level": "None",
    "valid_for_create": True, "valid_for_update": True, "valid_for_read": True,
    "options": [[1, "Yes", None], [0, "No", None]], "custom": True,
}

_FIELD = re.compile(r"^\*\*(\w+)\*\*:\s*(.*?)(<br />)?\s*$")
_CASCADE = re.compile(r"^- \*\*(Merge|Delete)\*\*: (\w+)\s*$")
_OPTION = re.compile(r"^- \*\*(?:TrueOption |FalseOption )?Value\*\*: (-?\d+) \*\*Label\*\*: (.+?)(?: \*\*(?:State|DefaultStatus)\*\*: (\d+))?(?: \*\*InvariantName\*\*.*)?$")


def parse_relationships(path: Path) -> list[dict]:
    """The one-to-many relationships of an entity page: ``ReferencingEntity``, ``ReferencingAttribute`` and
    the ``Merge`` / ``Delete`` cascade of each (what a merge or delete of the referenced row does to the
    rows that point at it)."""
    out: list[dict] = []
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section == "One-To-Many Relationships" and line.startswith("### "):
            out.append({})
        elif section == "One-To-Many Relationships" and out:
            m = _FIELD.match(line) or _CASCADE.match(line.strip())
            if m:
                out[-1][m.group(1)] = m.group(2).strip()
    return [r for r in out if "ReferencingEntity" in r and "ReferencingAttribute" in r]


def add_cascades(schema: dict, folder: Path) -> None:
    """Record on each kept lookup how a merge and a delete of the row it points at cascade to it:
    ``"cascade": {"<referenced entity>": {"merge": "Cascade"|"NoCascade", "delete": "Cascade"|"RemoveLink"|...}}``."""
    for referenced in schema:
        for rel in parse_relationships(folder / f"{referenced}.md"):
            spec = schema.get(rel["ReferencingEntity"])
            col = next((c for c in spec["columns"] if c["logical_name"] == rel["ReferencingAttribute"]), None) \
                if spec else None
            if col is not None and col["type"] in ("Lookup", "Customer"):
                col.setdefault("cascade", {})[referenced] = {"merge": rel.get("Merge", "NoCascade"),
                                                             "delete": rel.get("Delete", "RemoveLink")}


def parse_entity(path: Path, entity: str) -> dict:
    """Parse one entity reference page into ``{"entity_set", "primary_id", "columns": [...]}``."""
    text = path.read_text(encoding="utf-8")
    props = dict(re.findall(r"^\*\*(EntitySetName|PrimaryIdAttribute|PrimaryNameAttribute)\*\*: (\w+)", text, re.M))
    columns = []
    section = ""
    current: dict | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            current = None
            continue
        if line.startswith("### "):
            current = {"read_only_section": section.startswith("Read-only"), "options": []}
            columns.append(current)
            continue
        if current is None:
            continue
        m = _FIELD.match(line)
        if m:
            current[m.group(1)] = m.group(2).strip()
            continue
        o = _OPTION.match(line.strip())
        if o:
            current["options"].append([int(o.group(1)), o.group(2).strip(), int(o.group(3)) if o.group(3) else None])
    out = []
    for raw in columns:
        name = raw.get("LogicalName")
        kind = raw.get("Type")
        if not name or raw.get("IsValidForRead") == "False":
            continue
        if name == props["PrimaryIdAttribute"]:
            kind = "Uniqueidentifier"
        elif name in KEPT_LOOKUPS.get(entity, ()):
            pass
        elif kind not in KEPT_TYPES or SKIPPED.match(name):
            continue
        elif kind == "BigInt" and name != "versionnumber":
            continue
        read_only = raw["read_only_section"]
        if kind == "Money" and read_only:
            continue  # the *_base shadows and rollups: computed by the platform, not data the sync maps
        if read_only and kind == "String" and name != props.get("PrimaryNameAttribute"):
            continue  # the *name / *yominame shadows of lookups: not data the sync maps
        col = {
            "logical_name": name,
            "type": kind,
            "required_level": raw.get("RequiredLevel", "None"),
            "valid_for_create": not read_only and raw.get("IsValidForCreate") != "False",
            "valid_for_update": not read_only and raw.get("IsValidForUpdate") != "False",
            "valid_for_read": True,
        }
        if raw.get("MaxLength"):
            col["max_length"] = int(raw["MaxLength"])
        for key, field in (("min_value", "MinValue"), ("max_value", "MaxValue")):
            if raw.get(field) and kind in ("Integer", "Money"):
                col[key] = int(float(raw[field]))
        if raw.get("Precision") and kind == "Money":
            col["precision"] = int(raw["Precision"])
        if raw.get("Targets"):
            col["targets"] = raw["Targets"].split(",")
        if raw["options"]:
            col["options"] = raw["options"]
        if raw.get("DateTimeBehavior"):
            col["format"] = raw.get("Format", "DateAndTime")
        out.append(col)
    if entity in ("contact", "lead"):
        out.append(dict(LINK_COLUMN))
        out.append(dict(DELETED_FLAG_COLUMN))
    return {
        "logical_name": entity,
        "entity_set": props["EntitySetName"],
        "primary_id": props["PrimaryIdAttribute"],
        "primary_name": props.get("PrimaryNameAttribute"),
        "columns": sorted(out, key=lambda c: c["logical_name"]),
    }


def main(argv: list[str]) -> None:
    """Write ``schema.json`` next to this module from the reference folder named in ``argv[1]``."""
    folder = Path(argv[1])
    schema = {e: parse_entity(folder / f"{e}.md", e) for e in ENTITIES}
    add_cascades(schema, folder)
    target = Path(__file__).with_name("schema.json")
    target.write_text(json.dumps(schema, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for entity, spec in schema.items():
        print(f"{entity}: {len(spec['columns'])} columns")


if __name__ == "__main__":
    main(sys.argv)
