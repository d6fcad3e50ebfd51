"""The shared contract between Tollway's services: events, control messages, config, prices, DDL."""
