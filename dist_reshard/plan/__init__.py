"""The pure planner: targets, reads and buckets as plain data, from metadata alone (no I/O, no process group)."""
