"""Learning from users: dataset and redaction, training, evaluation, registry and canary, scheduler."""
