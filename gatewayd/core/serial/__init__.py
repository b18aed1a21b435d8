"""Serial lines under trio: one link per port (``link``), the set of them (``links``), ``gatewayd serial probe``."""
