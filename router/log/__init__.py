"""What the router writes down: the Parquet decision log, MLflow tracking and the state snapshot."""
