"""Students, distillation losses, plans and the stage runner: training from stores, no teacher in memory."""
