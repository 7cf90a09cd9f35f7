"""kdtool.distill: data-free noise knowledge distillation (``kdtool distill``; see issue 3)."""
