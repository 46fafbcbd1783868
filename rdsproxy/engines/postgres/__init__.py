"""PostgreSQL engine: v3 wire protocol handling, pinning rules and session state."""
