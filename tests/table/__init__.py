"""Tests of the shared-memory session table (issue 3): no Django involved."""
