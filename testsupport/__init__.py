"""Real-peer helpers that tests and benchmarks share: a `redis-server` on a free loopback port
(`testsupport.redis_server`) and an OTLP/HTTP trace receiver (`testsupport.otlp_receiver`).

Tests (`tests/`) and benchmark scripts (`benchmarks/`) may both import this package; it imports
neither of them, and nothing shipped (gateway, serving, prompt_registry) imports it. Not part of
the installed distribution: tests and benchmarks run from the repository root.
"""
