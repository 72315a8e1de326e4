"""Development support shared by tests and benchmarks (never shipped in the Bento): test photos, a service launcher."""
