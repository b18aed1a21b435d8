"""The site dashboard at `/`: what a technician reads without training (docs/dashboard.md).

Server-rendered pages (Jinja, autoescaped) with a small script of our own for the live
parts; no CDN, nothing vendored. `sessions.py` turns the admin token into a session
cookie, `plugin_views.py` asks family plugins for device health, telemetry and panels,
`pages.py` gathers what each page shows, `chart.py` draws telemetry as SVG, `http.py`
serves it all.
"""

from .http import dashboard_blueprint
from .pages import DashboardSources
from .plugin_views import PluginViews
from .sessions import DashboardSessions

__all__ = ["DashboardSessions", "DashboardSources", "PluginViews", "dashboard_blueprint"]
