"""Meter: consume usage events, price them, write them to ClickHouse exactly once."""
