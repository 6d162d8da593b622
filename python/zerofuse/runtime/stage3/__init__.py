"""ZeRO stage 3: parameters partitioned across ranks and gathered module by
module while used (partitioned_params.py), zero.Init (init_partition.py,
init_context.py) and GatheredParameters (gathered.py)."""
