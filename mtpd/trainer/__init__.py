"""Students, losses, plans, the training engine and its stages: training from stores, no teacher in memory."""
