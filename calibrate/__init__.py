"""kdtool.calibrate: recompute the student's BatchNorm statistics from real batches, fold BN."""
