"""The OpenAI-compatible HTTP shim: an actor that serves HTTP/SSE over the SDK.

``actor`` runs the server, ``routes`` holds the endpoints, ``schemas`` the request
bodies, ``params`` maps a body to SDK requests, ``generation`` runs them, ``formats``
and ``sse`` shape the answers, ``metrics`` the Prometheus counters, ``errors`` the
OpenAI-style error bodies.
"""
