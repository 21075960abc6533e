"""Training across processes on torch.distributed, applied to the model from outside it: the device mesh
(mesh.py), FSDP2 (fsdp.py), expert parallelism (expert_parallel.py), tensor parallelism (tensor_parallel.py),
sharded checkpoints (checkpoint.py), and `dsv3 plan` (plan.py), which sizes a cluster without one."""
