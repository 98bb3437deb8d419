"""Benchmarks that ship with the package (`rtnf bench ...`)."""
