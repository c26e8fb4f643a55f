"""How the ranks of a worker group cooperate: communication, the DDP/FSDP strategy, precision, CPU memory.

Layers, imports flowing down: ``strategy`` (wraps the model, owns its state dicts) uses ``precision`` (what
autocast and FSDP's mixed precision compute in) and ``comm`` (process groups and the few collectives dtrain
needs, each taking ``group=``); ``cpu_allocator`` stands alone. Nothing here imports the trainer.
"""
