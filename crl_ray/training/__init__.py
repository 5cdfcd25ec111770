"""Stage 4, training: pure-torch loss terms (``losses``), LoRA and truncated forwards (``model``), the latent and
soft-prompt miners (``mining``), one step's loss (``step``; these four never import Ray, MLflow or Optuna) and the
Ray Train V2 job (``train``: FSDP2 workers, checkpoints, adapter export)."""
