"""Executing a plan's read items: positional reads of exactly the planned byte ranges, and decoding what was read."""
