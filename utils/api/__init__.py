"""HTTP blueprints: thin layers that parse, call the services and serialize."""
