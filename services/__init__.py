"""Tollway's services: proxy, meter, billing (and the mock upstream). None imports another."""
