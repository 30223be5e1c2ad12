"""Test helpers: a private redis-server per test session, stores on unique key prefixes."""
