"""Helpers for testing code built on rpcstream."""
