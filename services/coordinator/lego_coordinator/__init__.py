"""The coordinator: per-request DAG state, batching, placement; its scheduler is a pure core."""
