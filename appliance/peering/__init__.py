"""Several appliance nodes working together: RPC workers that lend their devices to a head node,
and federation (cluster, auth, forward): appliances that forward requests to each other."""
