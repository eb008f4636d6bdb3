"""The deployable servers: one folder per service."""
