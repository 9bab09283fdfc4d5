"""The chaos suite (issue 6): faults injected into real workers, brokers and stores.

Run it with ``python -m tests.chaos``; every test adds a row to the summary table
printed at the end of the run.
"""
