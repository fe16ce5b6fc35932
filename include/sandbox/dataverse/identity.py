"""The sandbox organisation's identity: tenant, app registration, sync user, TLS CA and token signing.

Everything is generated on first start and kept in ``data_dir/identity.json`` (plus ``ca.pem`` /
``ca.key`` / ``server.pem``) so credentials, the tenant and the CA survive restarts.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import jwt
import trustme

from . import errors as E
from .errors import DataverseError


@dataclass
class Identity:
    """Credentials and ids of the sandbox tenant and organisation."""

    tenant_id: str
    client_id: str
    client_secret: str
    username: str
    user_password: str
    application_user_id: str  # the app registration's application user (client credentials grant)
    interactive_user_id: str  # the ROPC user
    organization_id: str
    business_unit_id: str
    field_security_profile_id: str
    signing_key: str

    @classmethod
    def ensure(cls, data_dir: Path, *, tenant_id=None, client_id=None, client_secret=None) -> "Identity":
        """Load ``identity.json`` or create it; explicit arguments override what was stored."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "identity.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        fresh = {
            "tenant_id": str(uuid.uuid4()), "client_id": str(uuid.uuid4()),
            "client_secret": secrets.token_urlsafe(32), "username": "mdsync-sync@sandbox.onmicrosoft.com",
            "user_password": secrets.token_urlsafe(18), "application_user_id": str(uuid.uuid4()),
            "interactive_user_id": str(uuid.uuid4()), "organization_id": str(uuid.uuid4()),
            "business_unit_id": str(uuid.uuid4()), "field_security_profile_id": str(uuid.uuid4()),
            "signing_key": secrets.token_hex(32),
        }
        values = {**fresh, **stored}
        for key, value in (("tenant_id", tenant_id), ("client_id", client_id), ("client_secret", client_secret)):
            if value:
                values[key] = value
        identity = cls(**values)
        path.write_text(json.dumps(asdict(identity), indent=1))
        path.chmod(0o600)
        return identity


def ensure_tls(data_dir: Path, host: str) -> tuple[Path, Path]:
    """Create (first start) or reuse the sandbox CA; issue the server certificate. Returns (ca, server)."""
    ca_path, key_path, server_path = data_dir / "ca.pem", data_dir / "ca.key", data_dir / "server.pem"
    if ca_path.exists() and key_path.exists():
        ca = trustme.CA.from_pem(ca_path.read_bytes(), key_path.read_bytes())
    else:
        ca = trustme.CA(organization_name="mdsync Dataverse sandbox")
        ca.cert_pem.write_to_path(str(ca_path))
        ca.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
    names = dict.fromkeys([host, "127.0.0.1", "localhost"])
    leaf = ca.issue_cert(*names)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(server_path))
    server_path.chmod(0o600)
    return ca_path, server_path


class TokenService:
    """Issues and checks the bearer tokens the Entra ID endpoints hand out (HS256 JWTs, expiring)."""

    def __init__(self, identity: Identity, issuer_base: str, ttl_s: int) -> None:
        self.identity = identity
        self.issuer = f"{issuer_base}/{identity.tenant_id}/v2.0"
        self.ttl_s = ttl_s
        self.revoked_before = 0.0  # tokens issued at or before this instant are rejected (expire_tokens fault)
        self.refresh_tokens: dict[str, str] = {}

    def _jwt(self, claims: dict) -> str:
        return jwt.encode(claims, self.identity.signing_key, algorithm="HS256")

    def issue(self, *, audience: str, subject: str, app_id: str, scope: str, with_user: bool) -> dict:
        """A token response as Entra ID's v2.0 token endpoint returns it."""
        now = time.time()
        claims = {"aud": audience, "iss": self.issuer, "iat": now, "nbf": int(now), "exp": int(now + self.ttl_s),
                  "appid": app_id, "oid": subject, "tid": self.identity.tenant_id, "jti": uuid.uuid4().hex}
        body = {"token_type": "Bearer", "expires_in": self.ttl_s, "ext_expires_in": self.ttl_s,
                "access_token": self._jwt(claims)}
        if with_user:
            body["scope"] = scope
            body["id_token"] = self._jwt({
                "aud": app_id, "iss": self.issuer, "iat": int(now), "exp": int(now + 3600), "sub": subject,
                "oid": subject, "tid": self.identity.tenant_id, "preferred_username": self.identity.username,
                "name": "mdsync sync user", "ver": "2.0"})
            info = json.dumps({"uid": subject, "utid": self.identity.tenant_id}).encode()
            body["client_info"] = base64.urlsafe_b64encode(info).decode().rstrip("=")
            refresh = secrets.token_urlsafe(32)
            self.refresh_tokens[refresh] = subject
            body["refresh_token"] = refresh
        return body

    def check(self, header: str | None, audience: str) -> str:
        """Validate ``Authorization: Bearer ...``; returns the user id (``oid``) or raises a 401."""
        if not header or not header.startswith("Bearer "):
            raise DataverseError(401, E.TOKEN, "Bearer token is missing.",
                                 {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        try:
            claims = jwt.decode(header[7:], self.identity.signing_key, algorithms=["HS256"], audience=audience,
                                leeway=0)
        except jwt.ExpiredSignatureError:
            raise DataverseError(401, E.TOKEN, "The access token has expired.",
                                 {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="The '
                                                      'access token expired"'}) from None
        except jwt.InvalidTokenError as exc:
            raise DataverseError(401, E.TOKEN, f"The access token is invalid: {exc}.",
                                 {"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        if claims["iat"] <= self.revoked_before:
            raise DataverseError(401, E.TOKEN, "The access token has expired.",
                                 {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="The '
                                                      'access token expired"'})
        return claims["oid"]
