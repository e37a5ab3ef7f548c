"""SelectiveMAE-DS: SelectiveMAE / MAE / CrossMAE pretraining on DeepSpeed with DALI input."""

__version__ = "0.1.0"
