"""Helpers for plugin authors: a fresh plugin host, tiny offline models, conformance checks."""
