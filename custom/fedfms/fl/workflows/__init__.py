"""Server workflows: FedAvg with checked, bounded, recorded rounds; the final evaluation; the FM-instructed-init pre-stage."""
