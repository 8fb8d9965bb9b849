"""The benchmark harness (``fmcomm bench``): one harness, one descriptor per collective."""
