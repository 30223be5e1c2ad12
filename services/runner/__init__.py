"""The agent runner service."""
