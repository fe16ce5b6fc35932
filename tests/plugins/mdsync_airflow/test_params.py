"""Run parameters against the real DAG's declared params: unknown keys are refused with the valid ones, values of
the wrong kind get one line."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from mdsync.errors import ConfigError
from mdsync_airflow.params import person_ids, run_params, validate_conf


@pytest.fixture(scope="module")
def declared():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    return bag.dags["marketo_dynamics_sync"].params


def problem(conf, declared) -> str:
    with pytest.raises(ConfigError) as err:
        validate_conf(conf, declared)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_valid_conf_passes(declared):
    validate_conf({"dry_run": True, "person_ids": [12, 13], "sync_as": "contact", "retry_failed": False}, declared)
    validate_conf({}, declared)
    validate_conf(None, declared)
    validate_conf({"undo_run": "manual__2026-11-22T08:00:00+00:00", "dry_run": True}, declared)
    validate_conf({"undo_run": None}, declared)


def test_an_unknown_key_is_refused_with_the_valid_ones_and_the_closest(declared):
    text = problem({"person_id": [12]}, declared)
    assert text.startswith("unknown run parameter 'person_id' (did you mean 'person_ids'?); the valid ones are ")
    for name in ("dry_run", "full_resync", "person_ids", "sync_as", "retry_failed"):
        assert name in text.split("the valid ones are ")[1]
    text = problem({"dryrun": True, "colour": "blue"}, declared)
    assert text.startswith("unknown run parameters 'dryrun' (did you mean 'dry_run'?), 'colour'; the valid ones are")


@pytest.mark.parametrize(("conf", "message"), [
    ({"person_ids": ["abc"]}, "run parameter person_ids[0]: 'abc' is not valid, expected a whole number "
                              "(person_ids = ['abc'])"),
    ({"person_ids": 12}, "run parameter person_ids: 12 is not valid, expected a list of whole numbers, e.g. [1234, "
                         "5678] (person_ids = 12)"),
    ({"dry_run": "yes"}, "run parameter dry_run: 'yes' is not valid, expected true or false (dry_run = 'yes')"),
    ({"sync_as": "account"}, "run parameter sync_as: 'account' is not valid, expected one of 'lead', 'contact'"),
    ({"undo_run": 12}, "run parameter undo_run: 12 is not valid, expected a string (undo_run = 12)"),
])
def test_a_value_of_the_wrong_kind_is_one_line(declared, conf, message):
    assert problem(conf, declared).startswith(message)


def test_conf_must_be_an_object(declared):
    assert problem(["dry_run"], declared).startswith("run parameters must be a JSON object such as")


def test_person_ids_are_positive_whole_numbers():
    assert person_ids([5, 5.0, 7]) == [5, 7] and person_ids(None) == []
    for bad, at in (([0], "person_ids[0]: 0"), ([3, -2], "person_ids[1]: -2"), ([1.5], "person_ids[0]: 1.5"),
                    ([True], "person_ids[0]: True")):
        with pytest.raises(ConfigError, match=r"^run parameter " + at.replace("[", r"\[").replace("]", r"\]")
                           + " is not a Marketo person id"):
            person_ids(bad)


def test_run_params_checks_the_runs_own_conf_against_the_dags_params(declared):
    context = {"dag": SimpleNamespace(params=declared), "dag_run": SimpleNamespace(conf={"person_id": [1]}),
               "params": {"dry_run": False, "person_ids": [], "person_id": [1]}}
    with pytest.raises(ConfigError, match="unknown run parameter 'person_id'"):
        run_params(context)
    context["dag_run"].conf = {"person_ids": [4, 4]}
    context["params"] = {"dry_run": False, "person_ids": [4, 4]}
    assert run_params(context)["person_ids"] == [4]
