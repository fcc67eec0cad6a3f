"""Cluster mode: membership, the consistent-hash ring, Redis-backed shared state."""
