"""What a training run adds to Lightning: callbacks (checkpoints, token throughput, text samples, confusion
matrices), the progress bar and progress lines, gradient monitoring, what the loggers record, and learning-rate
schedules. Configs name these as ``_target_``s (``conf/callbacks``, ``conf/logger``, ``conf/scheduler``)."""
