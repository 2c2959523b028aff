"""What every stage shares: the one error type, dtype tables, failure injection for tests, the version."""
