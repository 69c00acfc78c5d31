"""Running the daemon: settings, structured logs, metrics, the admin HTTP port, systemd
notification and the embedded Valkey server."""
