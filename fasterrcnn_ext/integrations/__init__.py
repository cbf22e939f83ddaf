"""Adapters that run the detector on other engines (Ray Data: integrations/ray.py, an optional extra)."""
