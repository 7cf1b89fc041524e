"""The nginx gateway: its configuration, rendered from a template (`deploy.nginx.render`)."""
