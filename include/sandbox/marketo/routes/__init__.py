"""The sandbox's HTTP API, one router per area; :data:`ROUTERS` in the order the app includes them."""

from __future__ import annotations

from . import activities, admin, bulk_export, bulk_import, custom_activities, identity, leads, stats

#: identity, Lead Database (leads, activities, custom activities), bulk export, bulk import, usage, admin
ROUTERS = (identity.router, leads.router, activities.router, custom_activities.router, bulk_export.router,
           bulk_import.router, stats.router, admin.router)

__all__ = ["ROUTERS"]
