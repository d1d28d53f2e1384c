"""Client side: the bundle learner and the executor that runs it."""
