"""Local training engines behind one interface, so the client does not care what runs the steps."""

from edge_client.engines.base import Batch, EvalStats, TrainingEngine, TrainStats

ENGINES = ("eager",)


def make_engine(name: str, task, threads: int | None = None) -> TrainingEngine:  # noqa: ANN001
    """Build the engine called ``name`` for ``task`` (a :class:`edgemole.config.TaskSpec`)."""
    from edgemole.errors import ConfigError

    if name == "eager":
        from edge_client.engines.eager import EagerEngine

        return EagerEngine(task, threads=threads)
    raise ConfigError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")


__all__ = ["ENGINES", "Batch", "EvalStats", "TrainStats", "TrainingEngine", "make_engine"]
