"""Workflow definitions: model, loader and validation, safe expressions."""
