"""The lead field catalogue the Marketo sandbox describes, stores and validates.

Standard fields follow ``reference/marketo/docs/list-of-standard-fields.md`` (types and lengths as a fresh
Marketo Engage subscription reports them through Describe); the custom fields are the link and sync-marker
fields the sync relies on (DESIGN §3).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Data types whose values are stored as text in SQLite.
TEXT_TYPES = frozenset({"string", "email", "phone", "url", "text", "reference", "date", "datetime"})
#: Data types Marketo accepts as ``filterType`` for custom fields (leads.md: string, email, integer).
SEARCHABLE_CUSTOM_TYPES = frozenset({"string", "email", "integer"})


@dataclass(frozen=True)
class LeadField:
    """One lead field as Describe reports it."""

    id: int
    name: str
    display_name: str
    data_type: str
    length: int | None = None
    read_only: bool = False
    custom: bool = False
    soap_name: str | None = None

    @property
    def sql_type(self) -> str:
        """SQLite column affinity for the field's values."""
        if self.data_type in ("integer", "score", "percent"):
            return "INTEGER"
        if self.data_type == "boolean":
            return "INTEGER"
        if self.data_type in ("float", "currency"):
            return "REAL"
        return "TEXT"

    def described(self, key: dict) -> dict:
        """The Describe item: ``key`` (id or name) then display name, data type and length when it has one."""
        item = {**key, "displayName": self.display_name, "dataType": self.data_type}
        if self.length is not None:
            item["length"] = self.length
        return item

    @property
    def searchable(self) -> bool:
        """Whether Get Leads by Filter Type and Sync Leads accept the field as filterType / lookupField."""
        if self.name in ("id", "email"):
            return True
        return self.custom and self.data_type in SEARCHABLE_CUSTOM_TYPES


def _std(spec: list[tuple]) -> list[LeadField]:
    out = []
    for n, (name, label, dtype, length, read_only) in enumerate(spec, start=1):
        out.append(
            LeadField(
                id=n,
                name=name,
                display_name=label,
                data_type=dtype,
                length=length,
                read_only=read_only,
                soap_name=name[0].upper() + name[1:],
            )
        )
    return out


# (rest name, label, data type, length, read only)
_STANDARD = [
    ("id", "Id", "integer", None, True),
    ("salutation", "Salutation", "string", 255, False),
    ("firstName", "First Name", "string", 255, False),
    ("middleName", "Middle Name", "string", 255, False),
    ("lastName", "Last Name", "string", 255, False),
    ("email", "Email Address", "email", 255, False),
    ("phone", "Phone Number", "phone", 255, False),
    ("mobilePhone", "Mobile Phone Number", "phone", 255, False),
    ("fax", "Fax Number", "phone", 255, False),
    ("title", "Job Title", "string", 255, False),
    ("dateOfBirth", "Date of Birth", "date", None, False),
    ("address", "Address", "text", 65535, False),
    ("city", "City", "string", 255, False),
    ("state", "State", "string", 255, False),
    ("country", "Country", "string", 255, False),
    ("postalCode", "Postal Code", "string", 255, False),
    ("website", "Website", "url", 255, False),
    ("company", "Company Name", "string", 255, False),
    ("site", "Site", "string", 255, False),
    ("department", "Department", "string", 255, False),
    ("industry", "Industry", "string", 255, False),
    ("annualRevenue", "Annual Revenue", "currency", None, False),
    ("numberOfEmployees", "Num Employees", "integer", None, False),
    ("sicCode", "SIC Code", "string", 40, False),
    ("mainPhone", "Main Phone", "phone", 255, False),
    ("billingStreet", "Billing Address", "text", 65535, False),
    ("billingCity", "Billing City", "string", 255, False),
    ("billingState", "Billing State", "string", 255, False),
    ("billingCountry", "Billing Country", "string", 255, False),
    ("billingPostalCode", "Billing Postal Code", "string", 255, False),
    ("leadRole", "Role", "string", 50, False),
    ("leadScore", "Lead Score", "integer", None, False),
    ("leadSource", "Lead Source", "string", 255, False),
    ("leadStatus", "Lead Status", "string", 255, False),
    ("rating", "Lead Rating", "string", 255, False),
    ("doNotCall", "Do Not Call", "boolean", None, False),
    ("doNotCallReason", "Do Not Call Reason", "string", 512, False),
    ("unsubscribed", "Unsubscribed", "boolean", None, False),
    ("unsubscribedReason", "Unsubscribed Reason", "text", 65535, False),
    ("emailInvalid", "Email Invalid", "boolean", None, False),
    ("emailInvalidCause", "Email Invalid Cause", "string", 2000, False),
    ("anonymousIP", "Anonymous IP", "string", 255, False),
    ("inferredCompany", "Inferred Company", "string", 255, True),
    ("inferredCountry", "Inferred Country", "string", 255, True),
    ("inferredCity", "Inferred City", "string", 255, True),
    ("inferredStateRegion", "Inferred State Region", "string", 255, True),
    ("inferredPostalCode", "Inferred Postal Code", "string", 255, True),
    ("inferredMetropolitanArea", "Inferred Metropolitan Area", "string", 255, True),
    ("inferredPhoneAreaCode", "Inferred Phone Area Code", "string", 255, True),
    ("jigsawContactId", "Marketo Data.com ID", "string", 255, True),
    ("jigsawContactStatus", "Marketo Data.com Status", "string", 255, True),
    ("isAnonymous", "Is Anonymous", "boolean", None, True),
    ("priority", "Priority", "integer", None, True),
    ("relativeScore", "Relative Score", "integer", None, True),
    ("urgency", "Urgency", "float", None, True),
    ("createdAt", "Created At", "datetime", None, True),
    ("updatedAt", "Updated At", "datetime", None, True),
]

_CUSTOM_START = 10001
_CUSTOM = [
    # The linked Dataverse record (DESIGN §3): its GUID and its type ("lead" or "contact").
    ("dynamicsRecordId", "Dynamics Record Id", "string", 36),
    ("dynamicsRecordType", "Dynamics Record Type", "string", 255),
    # The sync marker: the person is to be created in Dynamics, as a lead or a contact.
    ("syncToDynamics", "Sync to Dynamics", "boolean", None),
    ("dynamicsSyncAs", "Dynamics Sync As", "string", 255),
    # Set by the sync on a person whose linked Dynamics record was deleted (delete policy "flag").
    ("deletedInDynamics", "Deleted in Dynamics", "boolean", None),
]

LEAD_FIELDS: list[LeadField] = _std(_STANDARD) + [
    LeadField(id=_CUSTOM_START + i, name=n, display_name=label, data_type=t, length=ln, custom=True, soap_name=n)
    for i, (n, label, t, ln) in enumerate(_CUSTOM)
]
FIELDS_BY_NAME: dict[str, LeadField] = {f.name: f for f in LEAD_FIELDS}
#: Fields returned when a lead query names no ``fields`` (leads.md).
DEFAULT_LEAD_FIELDS = ("id", "updatedAt", "lastName", "email", "createdAt", "firstName")
#: Fields Marketo refuses as filterType / lookupField (error 1011), e.g. names.
UNSUPPORTED_LOOKUPS = frozenset(f.name for f in LEAD_FIELDS if not f.searchable)
