"""`make bench`: serving throughput and latency against in-process limits, runtimes, training speed."""
