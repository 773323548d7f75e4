"""helix_server."""
