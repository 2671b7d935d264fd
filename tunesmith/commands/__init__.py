"""CLI verb handlers: parse-free, thin wrappers over library functions."""
