"""A minimal Django project on the shared-memory session engine (demo, end-to-end tests, bench)."""
