"""Serving benchmarks (`visualchat bench serving`)."""
