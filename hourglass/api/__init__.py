"""What people and programs talk to: the REST API and report pages, the CLI, the `serve` wiring."""
