"""``python -m deltatune.cli`` (what ``torchrun -m deltatune.cli train run.yaml`` runs)."""

from deltatune.cli.main import main

main()
