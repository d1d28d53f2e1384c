"""Server components that listen to the run: contribution records, best-model selection."""
