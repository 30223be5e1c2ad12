"""Pure folds over the log: run state machine, run index, audit trail, metrics model."""
