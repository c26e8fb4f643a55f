"""`dtrain eval RUN_DIR|CHECKPOINT`: metrics of a trained model on a split (torch imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(name="eval")
@click.argument("target", type=click.Path(exists=False))
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option(
    "--checkpoint",
    "which",
    type=click.Choice(["latest", "best"]),
    default="latest",
    show_default=True,
    help="For a run directory: its newest valid checkpoint or best.pt.",
)
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write one row per event to this .npz file: its index in the data file plus the task's "
    "columns (classification: labels, softmax, predictions; regression: <target>_pred and "
    "<target>_true; your own task: what its predictions() returns, else its raw outputs).",
)
@click.option("--batch-size", type=int, default=0, help="Evaluation batch size (0 = the run's).")
@click.option("--data", "data_path", default=None, help="Evaluate on another HDF5 file with the same layout.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(
    target: str, split: str, which: str, predictions: str | None, batch_size: int, data_path: str | None, as_json: bool
) -> None:
    """Evaluate the checkpoint of a run (or a checkpoint file) on a data split, in one process."""
    from dist_train.eval_run import evaluate_checkpoint
    from dist_train.import_path import worker_imports

    # An imported model or task ("my_models:Net") loads as it did in the workers.
    with worker_imports():
        metrics = evaluate_checkpoint(
            Path(target),
            split=split,
            which=which,
            predictions_path=Path(predictions) if predictions else None,
            batch_size=batch_size,
            data_path=data_path,
        )
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    click.echo(f"{metrics['checkpoint']} (epoch {metrics['epoch']}, step {metrics['step']})")
    click.echo(metrics_table(metrics, split))
    if predictions:
        click.echo(f"  predictions -> {predictions}")


def metrics_table(metrics: dict[str, object], split: str) -> str:
    """Every metric the task reported for ``split``, one per line in the task's order (a custom task's
    keys included): tasks report different names, so none is assumed."""
    rows = {k: v for k, v in metrics.items() if k.startswith(f"{split}/") and isinstance(v, int | float)}
    width = max((len(k) for k in rows), default=0)
    return "\n".join(f"  {key:<{width}}  {value:.6g}" for key, value in rows.items())
