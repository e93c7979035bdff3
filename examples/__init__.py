"""Example job types (``JOBS_MODULE=examples.convert,examples.primes``) and their tests."""
