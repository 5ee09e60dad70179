"""Benchmarks behind `loadsvc bench ...`: each measures loadsvc and a baseline in the same run."""
