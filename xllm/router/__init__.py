"""The global scheduler: which instance serves each request."""
