"""Reports: the HTML report of a run and the throughput bench. Imports any layer below; only the command line
imports it."""
