"""Moving KV between instances: the shared KV pool and the KV agent actor."""
