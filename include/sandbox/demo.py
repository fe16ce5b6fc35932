"""``make demo``: the sync end to end against both sandboxes, through the real Airflow DAG.

Starts the Marketo and Dataverse sandboxes, seeds a few thousand persons, leads and contacts that overlap by
email, then runs sync cycles (each a manual run of ``marketo_dynamics_sync`` via ``dag.test()``) with edits on
both sides between them: changes on one side, a collision on a lead and on a contact, a value Dynamics
rejects, a new contact created in Dynamics and a person marked for sync in Marketo. After each cycle it prints
what the cycle did, from the state store's activity log and the sandboxes' call counters. Everything it starts
is stopped at the end; its files stay in ``.demo/`` (task logs in ``.demo/logs``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

from faker import Faker

from sandbox.dataverse import DataverseSandbox
from sandbox.marketo import MarketoSandbox

ROOT = Path(__file__).resolve().parents[2]


def _people(n: int, seed: int = 42) -> list[dict]:
    fake = Faker(["en_US", "de_DE", "fr_FR", "es_ES"])
    Faker.seed(seed)
    people = []
    for i in range(n):
        first, last = fake.first_name(), fake.last_name()
        local = unicodedata.normalize("NFKD", f"{first}.{last}.{i}").encode("ascii", "ignore").decode()
        people.append({"first": first, "last": last, "email": local.lower().replace(" ", "") + "@example.com",
                       "title": fake.job()[:90], "city": fake.city()[:60], "company": fake.company()[:90],
                       "phone": fake.numerify("+1 555 ### ####")})
    return people


def seed(marketo: MarketoSandbox, dataverse: DataverseSandbox, n: int = 3000) -> dict:
    """Persons in Marketo, contacts and leads in Dynamics; most overlap by email, some exist on one side only."""
    people = _people(n)
    in_marketo = people[: int(n * 0.8)]
    contacts = people[int(n * 0.3) : int(n * 0.65)]  # overlap with Marketo, plus none Dynamics-only
    leads = people[int(n * 0.65) :]  # partly Marketo-only overlap, the tail exists only in Dynamics
    marketo.seed_leads([{"email": p["email"].title() if i % 7 == 0 else p["email"], "firstName": p["first"],
                         "lastName": p["last"], "title": p["title"], "city": p["city"], "company": p["company"],
                         "phone": p["phone"]} for i, p in enumerate(in_marketo)])
    dataverse.seed("contacts", [{"emailaddress1": p["email"], "firstname": p["first"], "lastname": p["last"],
                                 "jobtitle": p["title"], "address1_city": p["city"], "telephone1": p["phone"]}
                                for p in contacts])
    dataverse.seed("leads", [{"emailaddress1": p["email"], "firstname": p["first"], "lastname": p["last"],
                              "jobtitle": p["title"], "address1_city": p["city"], "companyname": p["company"],
                              "telephone1": p["phone"], "leadsourcecode": 8} for p in leads])
    print(f"seeded {len(in_marketo):,} Marketo persons, {len(contacts):,} Dynamics contacts, {len(leads):,} Dynamics leads "
          f"(overlapping by email; emails differ in case for some)")
    return {"contacts": contacts, "leads": leads, "marketo": in_marketo}


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.env = dict(os.environ)

    def run_cycle(self, n: int, marketo: MarketoSandbox, dataverse: DataverseSandbox, conf: str = "{}") -> str:
        """One manual DAG run in a child process; its log goes to .demo/logs/cycle-N.log."""
        marketo.admin("POST", "/calls/reset")
        dataverse.admin("POST", "calls/reset")
        log = self.logs / f"cycle-{n}.log"
        started = time.monotonic()
        with log.open("w") as fh:
            done = subprocess.run([sys.executable, "-m", "mdsync_airflow.run_once", "--conf", conf], env=self.env,
                                  stdout=fh, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            print(log.read_text()[-4000:])
            raise SystemExit(f"cycle {n} failed; the whole log is {log}")
        m_calls = marketo.calls()["by_endpoint"]
        d_calls = dataverse.calls()["by_endpoint"]
        run_id = next((line.split("run_id=")[1].split(",")[0] for line in log.read_text().splitlines()
                       if "DagRun Finished" in line and "run_id=" in line), None)
        print(f"\n=== cycle {n}: {time.monotonic() - started:.0f} s, API calls: Marketo {sum(m_calls.values())} "
              f"(tokens {sum(v for k, v in m_calls.items() if 'token' in k)}), "
              f"Dataverse {sum(d_calls.values())} (tokens {sum(v for k, v in d_calls.items() if 'token' in k)}); "
              f"log: {log.relative_to(ROOT) if log.is_relative_to(ROOT) else log}")
        summary, inside = [], False
        for line in log.read_text().splitlines():
            if "sync summary" in line:
                inside = True
                summary.append("sync summary" + line.split("sync summary", 1)[1])
            elif inside:
                summary.append(line.split(" [mdsync.cycle]")[0])
                if "[mdsync.cycle]" in line:
                    break
        print("\n".join(f"  {s}" for s in summary))
        return run_id

    def summarize(self, run_id: str) -> None:
        from mdsync.activity import format_line
        from mdsync.state import open_store

        store = open_store(self.env["MDSYNC_STATE_URL"])
        rows = store.activity(run_id=run_id)
        if rows.empty:
            print("  activity: none (no record needed a write, a link or a decision)")
            return
        counts = Counter(zip(rows["action"], rows["entity_type"].fillna("-")))
        print("  " + ", ".join(f"{action} {entity}: {n}" for (action, entity), n in sorted(counts.items())))
        shown = Counter()
        for row in rows.to_dict("records"):
            if row["action"] in ("collision", "error", "ambiguous") or shown[row["action"]] < 2:
                shown[row["action"]] += 1
                print("   ", format_line(row))


def main() -> int:
    workdir = ROOT / ".demo"
    shutil.rmtree(workdir, ignore_errors=True)
    demo = Demo(workdir)
    demo.logs.mkdir(parents=True)
    airflow_home = workdir / "airflow"
    demo.env.update({
        "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MDSYNC_STATE_URL": f"sqlite:///{workdir / 'state.sqlite'}", "MDSYNC_STAGING_URL": f"file://{workdir / 'staging'}",
        "MDSYNC_OVERLAP_SECONDS": "2", "MDSYNC_TASK_RETRIES": "1", "MDSYNC_RETRY_DELAY_SECONDS": "5",
        "MDSYNC_KEEP_STAGING": "1",
    })
    print("preparing Airflow's metadata database (.demo/airflow) ...")
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=demo.env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with MarketoSandbox(workdir / "marketo") as marketo, DataverseSandbox(workdir / "dataverse") as dataverse:
        print(f"sandboxes up: Marketo {marketo.base_url}, Dataverse {dataverse.org_url}")
        demo.env["AIRFLOW_CONN_MARKETO_DEFAULT"] = marketo.connection_json()
        demo.env["AIRFLOW_CONN_DYNAMICS_DEFAULT"] = dataverse.connection_json()
        seeded = seed(marketo, dataverse)

        print("\ncycle 1 links existing records by email and creates Marketo persons for Dynamics-only contacts and leads")
        demo.summarize(demo.run_cycle(1, marketo, dataverse))

        edits = make_edits(demo, marketo, dataverse, seeded)
        print("\nedits made between cycles 1 and 2:")
        for line in edits:
            print(f"  - {line}")
        demo.summarize(demo.run_cycle(2, marketo, dataverse))

        print("\ncycle 3: only our own writes come back as changes; they must produce no writes (no ping-pong),"
              " and the rejected value is not re-sent")
        demo.summarize(demo.run_cycle(3, marketo, dataverse))

        person = edits_person(demo, "collision")
        print(f"\nhistory of one person (make activity EMAIL={person}):")
        from mdsync.activity import main as activity_main

        activity_main(["--email", person, "--state-url", demo.env["MDSYNC_STATE_URL"]])
    print("\nsandboxes stopped; demo files are in .demo/ (state store, staging, task logs)")
    return 0


def _clients(demo: Demo):
    from mdsync.dynamics import DynamicsClient
    from mdsync.marketo import MarketoClient
    import json

    m = json.loads(demo.env["AIRFLOW_CONN_MARKETO_DEFAULT"])
    d = json.loads(demo.env["AIRFLOW_CONN_DYNAMICS_DEFAULT"])
    return (MarketoClient(m["host"], m["login"], m["password"]),
            DynamicsClient(d["host"], d["login"], d["password"], d["extra"]["tenant_id"], authority=d["extra"]["authority"],
                           verify=d["extra"]["verify"]))


_PICKED: dict[str, str] = {}


def edits_person(demo: Demo, what: str) -> str:
    return _PICKED[what]


def make_edits(demo: Demo, marketo: MarketoSandbox, dataverse: DataverseSandbox, seeded: dict) -> list[str]:
    """Edits on both sides through the real APIs (so they show up as changes, as a person's would)."""
    from mdsync.state import open_store

    mk, dy = _clients(demo)
    links = open_store(demo.env["MDSYNC_STATE_URL"]).load_links()
    leads = links[links["dynamics_type"] == "lead"].index[:25].tolist()
    contacts = links[links["dynamics_type"] == "contact"].index[:25].tolist()
    out = []
    # Marketo-only changes on lead-linked persons; Dynamics-only changes on contacts
    mk.sync_leads([{"id": int(p), "title": f"Growth Marketer {i}"} for i, p in enumerate(leads[1:11])], "updateOnly", "id")
    out.append("10 job titles changed in Marketo (persons linked to leads)")
    dy.update_multiple("contacts", [{"contactid": links.loc[p, "dynamics_id"], "telephone1": f"+1 555 010 {i:04d}"}
                                    for i, p in enumerate(contacts[1:11])])
    out.append("10 phone numbers changed in Dynamics (contacts)")
    # a collision on a lead (Marketo wins) and on a contact (Dynamics wins)
    lead_pid, contact_pid = int(leads[0]), int(contacts[0])
    mk.sync_leads([{"id": lead_pid, "city": "Marketo City"}, {"id": contact_pid, "city": "Marketo City"}], "updateOnly", "id")
    dy.update_multiple("leads", [{"leadid": links.loc[lead_pid, "dynamics_id"], "address1_city": "Dynamics City"}])
    dy.update_multiple("contacts", [{"contactid": links.loc[contact_pid, "dynamics_id"], "address1_city": "Dynamics City"}])
    email = mk.get_leads("id", [contact_pid], ["email"])["email"].iloc[0]
    _PICKED["collision"] = email
    out.append(f"city changed on both sides for lead-linked person {lead_pid} and contact-linked person {contact_pid}")
    # a value Dynamics rejects (a business rule), next to a change it accepts
    dataverse.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid", "values": ["Intern"],
                                      "message": "Contacts cannot have the job title Intern (business rule)."}])
    rejected = int(contacts[11])
    mk.sync_leads([{"id": rejected, "title": "Intern", "lastName": "Renamed"}], "updateOnly", "id")
    out.append(f"person {rejected} (a contact) got job title 'Intern', which a Dynamics business rule rejects, and a new last name")
    # a new contact in Dynamics, a person marked for sync in Marketo
    dy.create_multiple("contacts", [{"emailaddress1": "new.contact@example.com", "firstname": "Nadia", "lastname": "New"}])
    out.append("a new contact created in Dynamics: new.contact@example.com")
    unlinked = mk.get_leads("email", [seeded["marketo"][5]["email"]], ["email"])
    mk.sync_leads([{"id": int(unlinked["id"].iloc[0]), "syncToDynamics": True, "dynamicsSyncAs": "lead"}], "updateOnly", "id")
    out.append(f"Marketo person {int(unlinked['id'].iloc[0])} marked for sync to Dynamics (as a lead)")
    return out


if __name__ == "__main__":
    sys.exit(main())
