"""LightningModules: training logic, metrics and generation for each task."""
