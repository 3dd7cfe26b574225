"""The HTTP side: the quart-trio app (ingress, health, API, dashboard) and its server."""
