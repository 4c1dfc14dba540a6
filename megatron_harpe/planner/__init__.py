"""The planner: what a config will cost before anything is built (`pretrain_harpe.py --dry-run`,
`tools/plan_memory.py`).

parameters.py counts the model's parameters per TP rank; memory.py adds up the bytes per GPU and
the time of a step for a layout (engine_memory.py: the sharding engine's states and the headroom;
communication.py: the traffic of a step; document_cost.py: attention with document masking);
plan.py prints the plan of a config.
"""
