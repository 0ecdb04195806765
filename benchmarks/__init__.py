"""zhchat.benchmarks."""
