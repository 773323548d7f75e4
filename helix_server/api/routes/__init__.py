"""Litestar controllers, one per group of endpoints."""
