"""The operator surface: daemon, config, control socket, metrics, systemd."""
