"""telephony-forwarder's domain and wiring: config, events, the NATS bridge, the supervisor, the CLI."""
