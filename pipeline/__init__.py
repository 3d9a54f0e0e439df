"""Orchestration and the pngrow command line."""
