"""Tests of the operations files: compose stack, alert rules, dashboards."""
