"""Billing service: teams, keys and plans (published to the control topic) and the usage API."""
