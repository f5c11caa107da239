"""Profilers: find the heads (or dimensions) a method needs and write a head-list artifact."""
