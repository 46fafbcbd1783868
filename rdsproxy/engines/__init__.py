"""Database engine adapters: the wire-protocol specifics of each supported engine."""
