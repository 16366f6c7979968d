"""Built-in sink plugins: IPVS, HAProxy, SNMP traps, email."""
