"""Sinks: where detections go (the JSONL event log, annotated frames)."""
