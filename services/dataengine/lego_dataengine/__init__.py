"""The data engine: a per-host tensor store that workers publish to and read from."""
