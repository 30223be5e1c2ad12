"""Workflow definitions several test modules run."""

from __future__ import annotations

#: A diamond: one root, three steps in parallel after it, one join after them (three levels).
DIAMOND = """
name: diamond
steps:
  - {id: start, agent: echo, with: {value: 0}}
  - {id: a, agent: echo, with: {value: 1}, depends_on: [start]}
  - {id: b, agent: echo, with: {value: 2}, depends_on: [start]}
  - {id: c, agent: echo, with: {value: 3}, depends_on: [start]}
  - {id: join, agent: echo, with: {value: 4}, depends_on: [a, b, c]}
"""
