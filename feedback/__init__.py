"""Learning from users: dataset, redaction, training, evaluation, canary, scheduler."""
