"""What training is made of: models, losses, the step, the loop, evaluation, run files. Imports trainer.config and pipeline."""
