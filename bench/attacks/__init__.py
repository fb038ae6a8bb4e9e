"""The attack suite of issue 12 (`scripts/bench attacks`): hostile clients against a real
broker, each bounded, with a well-behaved probe measured meanwhile. See runner.py."""
