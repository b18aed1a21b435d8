"""Devices: the registry and its secrets, authentication schemes, rate limits, presence, commands.

``services`` builds them together for a gateway and binds them to each plugin's family.
"""
