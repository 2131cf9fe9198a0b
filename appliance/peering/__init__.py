"""Several appliance nodes working together: RPC workers that lend their devices to a head node."""
