"""Bridges to the tools attnkit's users already evaluate with (lm-evaluation-harness).

Each bridge lives in its own module and imports its tool only there, so the tool stays an optional
extra and ``import attnkit`` never pulls it in.
"""
