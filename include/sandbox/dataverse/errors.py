"""The Dataverse error shape (``{"error": {"code", "message"}}``) and the codes the sandbox answers with.

Codes and messages come from ``shared/reference/dataverse`` (NOTES.md, api-limits, batch and conditional
operation pages). Where the reference names an error but not its hex value (column-level security,
expired change-tracking token) the sandbox uses the code documented below; clients should key on the
HTTP status and message, as the sync's client does.
"""

from __future__ import annotations

VALIDATION = "0x80044331"  # "A validation error occurred. The length of the 'x' attribute ..."
PAYLOAD = "0x80048d19"  # malformed payload: wrong JSON type, unknown option value
UNKNOWN_PROPERTY = "0x80060888"  # "The property 'x' does not exist on type ..."
PLUGIN = "0x80040265"  # a business rule / plug-in rejected the write (ISV abort)
NOT_FOUND = "0x80040217"  # "<entity> With Id = <id> Does Not Exist"
DUPLICATE_KEY = "0x80040237"  # "A record with matching key values already exists."
# Column-level security (reference names AttributePermissionReadIsMissing / ...UpdateIsMissingDuringUpdate).
READ_SECURED = "0x8004f508"
UPDATE_SECURED = "0x8004f507"
CHANGE_TOKEN_EXPIRED = "0x80044352"  # expired change-tracking (delta) token: client must do a full read
THROTTLE_REQUESTS = "0x80072322"
THROTTLE_TIME = "0x80072321"
THROTTLE_CONCURRENCY = "0x80072326"
QUERY = "0x80060888"  # invalid $filter / $orderby / $select
NO_SEGMENT = "0x8006088a"  # "Resource not found for the segment '...'" (e.g. a bulk message a table lacks)
INVALID_STATE = "0x80048408"  # "State code is invalid or ... status code is invalid for a specific state code"
SERVER = "0x80040216"  # unexpected server error (injected faults)
TOKEN = "0x80072560"  # missing / expired / invalid bearer token


class DataverseError(Exception):
    """An error the Web API answers with: HTTP ``status`` plus the service's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body the real service sends for this error."""
        return {"error": {"code": self.code, "message": self.message}}
