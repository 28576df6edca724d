"""Files a run writes: its lock, all-or-nothing placement, the signals that may interrupt it,
and the file-system rules its outputs follow. Standard library only."""
