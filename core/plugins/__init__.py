"""The plugin host: entry points, the component registry, the run plan and core's built-in plugins.

``PluginHost`` loads the ``vlmr1`` entry points (:mod:`core.plugins.host`), hands their
components to a :class:`~core.plugins.registry.Registry`, and :func:`~core.plugins.plan.make_plan`
checks a run config against it before anything heavy loads. Core's own components are ordinary
plugins in :mod:`core.plugins.builtin`.
"""

from core.plugins.host import BUILTIN, ENTRY_POINT_GROUP, STATUSES, PluginError, PluginHost, PluginInfo, parse_selection

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "STATUSES", "PluginError", "PluginHost", "PluginInfo", "parse_selection"]
