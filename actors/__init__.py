"""The service's actors: one module each, talking over bounded trio channels."""
