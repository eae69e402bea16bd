"""The plan: buckets, keyed permutations, the planner, mixtures, the world. Standard library and NumPy only."""
