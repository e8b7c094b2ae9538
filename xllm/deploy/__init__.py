"""Deployments: the plan (what runs where), the launcher that builds it, the supervisor that
runs it, the entry point of every actor process, and the harness tests start them with."""
