"""Benchmarks of django-shmsession against the session backends users would pick instead.

Run them with `benchmarks/run` (see benchmarks/README.md). Not collected by pytest.
"""
