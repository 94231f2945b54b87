"""The data path: listener and workers, client sessions, the upstream link, relay hooks."""
