"""The runtime: nothing family-specific lives here."""
