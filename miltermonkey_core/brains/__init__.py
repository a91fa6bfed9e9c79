"""Brains that ship with the core, registered by entry point like any other."""
