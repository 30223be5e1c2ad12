"""The processes: scheduler, agent runner, checkpointer, metrics projector, CLI."""
