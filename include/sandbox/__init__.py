"""Local emulators of Marketo Engage and Dataverse (with its Entra ID token endpoint).

Real HTTP servers on loopback backed by SQLite, built to the official specs in ``../shared/reference``,
so the sync (and any third-party client of either API) runs against them unchanged.
"""
