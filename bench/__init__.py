"""The benchmark of the progress server (``make bench`` / ``python -m bench``); see bench/RESULTS.md."""
