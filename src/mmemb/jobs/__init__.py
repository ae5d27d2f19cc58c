"""File-to-file batch jobs, resumable: encode a JSONL of items into vectors; build, extend and
search a vector index from JSONL files.
"""
