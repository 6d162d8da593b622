"""Benchmarks that time zerofuse against the PyTorch equivalent in the same run
(`zerofuse bench`, or the scripts in the repository's bench/)."""
