"""The worker: runs batches of model calls on one device."""
