"""Benchmark evaluation: task data layers (`tasks`), the loop (`runner`), records, fixtures."""
