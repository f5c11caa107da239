"""Profilers: find the heads (or dimensions) a method needs and write an artifact.

:data:`attnkit.probes.registry.PROFILERS` names them; each has a typed config in :mod:`.configs`
and runs on the shared skeleton of :mod:`.run` (fingerprint, resumable progress, unit loop).
"""
