"""The Marketo sandbox over HTTPS (``tls=True`` / ``python -m sandbox.marketo --tls``), as Marketo is served.

A client that trusts the sandbox CA (``ca_bundle``) talks to it; one that does not is refused at the
handshake; plain HTTP gets no Marketo answer. The CA survives a restart. Responses are schema-checked.
"""

from __future__ import annotations

import json

import pytest
import requests
from sandbox.marketo import MarketoSandbox

from tests.fixtures.marketo_sandbox import schema_checking_hook
from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api


@pytest.fixture(scope="module")
def https_sandbox(tmp_path_factory):
    with MarketoSandbox(tmp_path_factory.mktemp("marketo-https"), tls=True) as sb:
        yield sb


def test_a_client_trusting_the_sandbox_ca_talks_to_it_over_https(https_sandbox):
    sb = https_sandbox
    assert sb.base_url.startswith("https://") and sb.ca_bundle.endswith("ca.pem")
    api = Api(sb)  # identity over HTTPS, trusting the CA
    ids = sb.seed_leads([{"email": "tls@example.com", "firstName": "T"}])
    body = api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "tls@example.com",
                                                          "fields": "email,firstName"})
    assert body["result"] == [{"id": ids[0], "email": "tls@example.com", "firstName": "T"}]
    created = api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": "new@example.com"}]})
    assert created["result"][0]["status"] == "created"
    assert api.checked == 3 and api.violations == []  # identity, the read and the write
    # The engine's client, given the CA as its connection's extra.verify says.
    from mdsync.marketo import MarketoClient

    extra = json.loads(sb.connection_json())["extra"]
    assert extra == {"verify": sb.ca_bundle}
    client = MarketoClient(sb.base_url, sb.client_id, sb.client_secret, verify=extra["verify"])
    seen: list = []
    client.session.hooks["response"].append(schema_checking_hook(api.violations, seen))
    assert client.get_leads("email", ["tls@example.com"], fields=["firstName"])["firstName"].tolist() == ["T"]
    assert len(seen) == client.calls_made >= 2 and api.violations == []  # identity, describe, the read


def test_clients_not_trusting_the_ca_or_speaking_plain_http_get_no_answer(https_sandbox):
    sb = https_sandbox
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(sb.base_url + "/identity/oauth/token", timeout=5)  # the system CAs only
    plain = sb.base_url.replace("https://", "http://") + "/identity/oauth/token"
    try:
        resp = requests.get(plain, timeout=5)
    except requests.ConnectionError:
        return
    assert resp.status_code >= 400 and "access_token" not in resp.text


def test_the_ca_is_kept_across_restarts(https_sandbox):
    sb = https_sandbox
    ca = (sb.data_dir / "ca.pem").read_bytes()
    sb.seed_leads([{"email": "keep@example.com"}])
    sb.stop()
    sb.start()
    assert (sb.data_dir / "ca.pem").read_bytes() == ca
    api = Api(sb)  # trusting the CA it had before
    body = api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "keep@example.com"})
    assert len(body["result"]) == 1 and api.violations == []
