"""Running calls: the planner (what a call runs, cached per shape), the runner (call
order, sequence numbers, the worker thread, the failure latch) and the executor (one
rank's schedule over a transport)."""
