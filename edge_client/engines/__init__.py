"""Local training engines behind one interface, so the client does not care what runs the steps."""

from pathlib import Path

from edge_client.engines.base import Batch, EvalStats, TrainingEngine, TrainStats

ENGINES = ("eager", "executorch")


def make_engine(name: str, task, threads: int | None = None, artifact: Path | None = None) -> TrainingEngine:  # noqa: ANN001
    """Build the engine called ``name`` for ``task`` (a :class:`edgemole.config.TaskSpec`); the ExecuTorch engine
    trains with the program in the ``artifact`` folder written by ``edgemole export``."""
    from edgemole.errors import ConfigError

    if name == "eager":
        from edge_client.engines.eager import EagerEngine

        return EagerEngine(task, threads=threads)
    if name == "executorch":
        from edge_client.engines.executorch import ExecuTorchEngine

        if artifact is None:
            raise ConfigError("--engine executorch needs --artifact DIR (written by 'edgemole export')")
        return ExecuTorchEngine(task, artifact, threads=threads)
    raise ConfigError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")


__all__ = ["ENGINES", "Batch", "EvalStats", "TrainStats", "TrainingEngine", "make_engine"]
