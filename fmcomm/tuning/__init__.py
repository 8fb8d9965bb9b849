"""Tuning: the cost model that prices schedules on a topology (``cost``), what it
predicts for each candidate (``explain``) and the simulator's sweep over sizes
(``fmcomm.simulator``)."""
