"""HTTP routers of the billing API: admin writes, usage reads, health and metrics."""
