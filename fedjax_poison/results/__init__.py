"""Results: metrics rows, statistics over seeds, tables and figures, read back from a run's
files as well as written at its end."""
