"""The heartbeat daemon: keepalives, active/passive state, floating IPs."""
