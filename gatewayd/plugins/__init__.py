"""The plugin contract: hook specifications, the manager, and the plugin API.

Plugin authors import from `gatewayd.plugins.api`; see docs/plugins.md.
"""
